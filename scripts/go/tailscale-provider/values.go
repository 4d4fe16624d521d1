package main

import (
	"fmt"

	"github.com/pulumi/pulumi/sdk/v3/go/property"
)

// Reading and writing property maps (the engine's values: numbers are
// float64, secrets and unknowns are flags on a value).

func known(m property.Map, key string) (property.Value, bool) {
	v, ok := m.GetOk(key)
	if !ok || v.IsNull() || v.IsComputed() {
		return property.Value{}, false
	}
	return v, true
}

func getString(m property.Map, key string) string {
	if v, ok := known(m, key); ok && v.IsString() {
		return v.AsString()
	}
	return ""
}

func getBool(m property.Map, key string) bool {
	if v, ok := known(m, key); ok && v.IsBool() {
		return v.AsBool()
	}
	return false
}

func getInt(m property.Map, key string) (int64, bool) {
	if v, ok := known(m, key); ok && v.IsNumber() {
		return int64(v.AsNumber()), true
	}
	return 0, false
}

func getStrings(m property.Map, key string) []string {
	v, ok := known(m, key)
	if !ok || !v.IsArray() {
		return nil
	}
	out := []string{}
	for _, e := range v.AsArray().AsSlice() {
		if e.IsString() {
			out = append(out, e.AsString())
		}
	}
	return out
}

func stringList(s []string) property.Value {
	vs := make([]property.Value, 0, len(s))
	for _, e := range s {
		vs = append(vs, property.New(e))
	}
	return property.New(vs)
}

// plain is a value without its secret flag and dependencies, for comparing.
func plain(v property.Value) any {
	switch {
	case v.IsNull():
		return nil
	case v.IsComputed():
		return "<computed>"
	case v.IsArray():
		out := []any{}
		for _, e := range v.AsArray().AsSlice() {
			out = append(out, plain(e))
		}
		return out
	case v.IsMap():
		out := map[string]any{}
		for k, e := range v.AsMap().All {
			out[k] = plain(e)
		}
		return out
	case v.IsString():
		return v.AsString()
	case v.IsBool():
		return v.AsBool()
	case v.IsNumber():
		return v.AsNumber()
	}
	return fmt.Sprint(v)
}

// checkTypes reports the inputs of the wrong type (unknowns pass).
func checkTypes(o object, inputs property.Map) []string {
	var bad []string
	for _, p := range o.props {
		v, ok := known(inputs, p.name)
		if !ok || !p.in {
			continue
		}
		var good bool
		switch p.kind {
		case "string":
			good = v.IsString()
		case "boolean":
			good = v.IsBool()
		case "integer":
			good = v.IsNumber() && v.AsNumber() == float64(int64(v.AsNumber()))
		case "stringList":
			good = v.IsArray()
			if good {
				for _, e := range v.AsArray().AsSlice() {
					good = good && (e.IsString() || e.IsComputed())
				}
			}
		}
		if !good {
			bad = append(bad, p.name)
		}
	}
	return bad
}
