package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	p "github.com/pulumi/pulumi-go-provider"
	"github.com/pulumi/pulumi/sdk/v3/go/property"
	"github.com/tailscale/hujson"
	tailscale "tailscale.com/client/tailscale/v2"
)

// ---- tailscale:index/tailnetKey:TailnetKey ----
//
// The real provider's semantics (terraform-provider-tailscale, as pulumi-tailscale
// bridges it), from its pull requests and issues found with the search tool:
//   - every argument is ForceNew (resource_tailnet_key.go's schema): a key is
//     never updated, only replaced;
//   - recreate_if_invalid (PR #310, "only recreate reusable keys by default"):
//     "always" recreates a key that became invalid (expired, revoked, spent),
//     "never" keeps it; unset recreates reusable keys only;
//   - a key the API no longer knows (404) is invalid too, and the same rule
//     applies (PR #771, issue #770: "recreate_if_invalid not respected when
//     key is not found");
//   - a read never overwrites `key` in the state (PR #765, issue #764);
//   - delete revokes the key and ignores a 404 (single-use keys may be gone).

func tailnetKeyOps() resourceOps {
	return resourceOps{
		schema: tailnetKey,
		check: func(in property.Map) []p.CheckFailure {
			var f []p.CheckFailure
			if r := getString(in, "recreateIfInvalid"); r != "" && r != "always" && r != "never" {
				f = append(f, p.CheckFailure{Property: "recreateIfInvalid", Reason: fmt.Sprintf("must be 'always' or 'never', not %q", r)})
			}
			if getString(in, "userId") != "" {
				// The client's CreateKeyRequest (v2.12.0) has no user: a key is
				// always the caller's. Refused rather than silently ignored.
				f = append(f, p.CheckFailure{Property: "userId", Reason: "not supported by this stand-in: a key belongs to the API caller"})
			}
			if e, ok := getInt(in, "expiry"); ok && e < 0 {
				f = append(f, p.CheckFailure{Property: "expiry", Reason: "must not be negative"})
			}
			return f
		},
		diff: func(req p.DiffRequest) (p.DiffResponse, error) {
			d := diffInputs(tailnetKey, oldInputs(req), req.Inputs, map[string]func(a, b property.Value) bool{
				"tags": sameStringSet,
			})
			// The last read found the key invalid and the key is to be
			// recreated: replace it (as the real provider's plan modifier does).
			if getBool(req.State, "invalid") && recreateInvalid(req.State) {
				d.HasChanges = true
				d.DetailedDiff["invalid"] = p.PropertyDiff{Kind: p.UpdateReplace}
			}
			return d, nil
		},
		create: func(ctx context.Context, c *tailscale.Client, in property.Map) (string, property.Map, error) {
			var req tailscale.CreateKeyRequest
			req.Description = getString(in, "description")
			req.ExpirySeconds, _ = getInt(in, "expiry")
			req.Capabilities.Devices.Create.Reusable = getBool(in, "reusable")
			req.Capabilities.Devices.Create.Ephemeral = getBool(in, "ephemeral")
			req.Capabilities.Devices.Create.Preauthorized = getBool(in, "preauthorized")
			req.Capabilities.Devices.Create.Tags = getStrings(in, "tags")
			k, err := c.Keys().CreateAuthKey(ctx, req)
			if err != nil {
				return "", property.Map{}, apiError("creating a tailnet key", err)
			}
			if k.ID == "" || k.Key == "" {
				return "", property.Map{}, fmt.Errorf("tailscale: creating a tailnet key: the API answered no id or key")
			}
			return k.ID, keyState(in, k, k.Key, false), nil
		},
		read: func(ctx context.Context, c *tailscale.Client, req p.ReadRequest) (p.ReadResponse, error) {
			state := req.Properties
			k, err := c.Keys().Get(ctx, req.ID)
			invalid := false
			switch {
			case tailscale.IsNotFound(err):
				invalid = true
			case err != nil:
				return p.ReadResponse{}, apiError("reading tailnet key "+req.ID, err)
			default:
				invalid = keyInvalid(k)
			}
			if invalid && recreateInvalid(state) {
				// Gone: the engine creates it anew.
				return p.ReadResponse{}, nil
			}
			inputs := req.Inputs
			if inputs.Len() == 0 {
				inputs = inputsOf(tailnetKey, state)
			}
			secret := state.Get("key")
			next := state
			if k != nil {
				next = keyState(inputsOf(tailnetKey, state), k, "", invalid)
			}
			next = next.Set("invalid", property.New(invalid))
			if !secret.IsNull() {
				next = next.Set("key", secret.WithSecret(true))
			}
			return p.ReadResponse{ID: req.ID, Properties: next, Inputs: inputs}, nil
		},
		delete: func(ctx context.Context, c *tailscale.Client, req p.DeleteRequest) error {
			err := c.Keys().Delete(ctx, req.ID)
			if err != nil && !tailscale.IsNotFound(err) {
				return apiError("revoking tailnet key "+req.ID, err)
			}
			return nil
		},
	}
}

// recreateInvalid: whether an invalid key is to be created again.
func recreateInvalid(state property.Map) bool {
	switch getString(state, "recreateIfInvalid") {
	case "always":
		return true
	case "never":
		return false
	}
	return getBool(state, "reusable")
}

func keyInvalid(k *tailscale.Key) bool {
	return k.Invalid || !k.Revoked.IsZero() || (!k.Expires.IsZero() && time.Now().After(k.Expires))
}

// keyState: the resource's outputs from its inputs and the API's key.
func keyState(in property.Map, k *tailscale.Key, secret string, invalid bool) property.Map {
	out := in.AsMap()
	caps := k.Capabilities.Devices.Create
	out["reusable"] = property.New(caps.Reusable)
	out["ephemeral"] = property.New(caps.Ephemeral)
	out["preauthorized"] = property.New(caps.Preauthorized)
	tags := caps.Tags
	if len(tags) == 0 {
		tags = k.Tags
	}
	if v, ok := known(in, "tags"); ok && sameStringSet(v, stringList(tags)) {
		out["tags"] = v // the program's order
	} else {
		out["tags"] = stringList(nonNil(tags))
	}
	out["description"] = property.New(k.Description)
	if _, ok := getInt(in, "expiry"); !ok && !k.Expires.IsZero() && !k.Created.IsZero() {
		out["expiry"] = property.New(float64(int64(k.Expires.Sub(k.Created).Seconds())))
	} else if _, ok := getInt(in, "expiry"); !ok {
		out["expiry"] = property.New(0.0)
	}
	out["userId"] = property.New(k.UserID)
	out["createdAt"] = property.New(rfc3339(k.Created))
	out["expiresAt"] = property.New(rfc3339(k.Expires))
	out["invalid"] = property.New(invalid || keyInvalid(k))
	if secret != "" {
		out["key"] = property.New(secret).WithSecret(true)
	}
	return property.NewMap(out)
}

// ---- tailscale:index/deviceSubnetRoutes:DeviceSubnetRoutes ----
//
// The enabled routes of one device (POST/GET device/{id}/routes). Its id is
// the device's id; a new deviceId replaces it; delete enables no route.

func subnetRoutesOps() resourceOps {
	return resourceOps{
		schema: subnetRoutes,
		diff: func(req p.DiffRequest) (p.DiffResponse, error) {
			return diffInputs(subnetRoutes, oldInputs(req), req.Inputs, map[string]func(a, b property.Value) bool{
				"routes": sameStringSet,
			}), nil
		},
		create: func(ctx context.Context, c *tailscale.Client, in property.Map) (string, property.Map, error) {
			device := getString(in, "deviceId")
			if err := c.Devices().SetSubnetRoutes(ctx, device, nonNil(getStrings(in, "routes"))); err != nil {
				return "", property.Map{}, apiError("enabling the routes of device "+device, err)
			}
			return device, in, nil
		},
		read: func(ctx context.Context, c *tailscale.Client, req p.ReadRequest) (p.ReadResponse, error) {
			device := getString(req.Properties, "deviceId")
			if device == "" {
				device = req.ID
			}
			routes, err := c.Devices().SubnetRoutes(ctx, device)
			if tailscale.IsNotFound(err) {
				return p.ReadResponse{}, nil
			}
			if err != nil {
				return p.ReadResponse{}, apiError("reading the routes of device "+device, err)
			}
			enabled := stringList(nonNil(routes.Enabled))
			state := req.Properties.Set("deviceId", property.New(device))
			if old, ok := known(state, "routes"); !ok || !sameStringSet(old, enabled) {
				state = state.Set("routes", enabled)
			}
			inputs := req.Inputs
			if inputs.Len() == 0 {
				inputs = state
			}
			return p.ReadResponse{ID: req.ID, Properties: state, Inputs: inputs}, nil
		},
		update: func(ctx context.Context, c *tailscale.Client, req p.UpdateRequest) (property.Map, error) {
			device := getString(req.Inputs, "deviceId")
			if err := c.Devices().SetSubnetRoutes(ctx, device, nonNil(getStrings(req.Inputs, "routes"))); err != nil {
				return property.Map{}, apiError("enabling the routes of device "+device, err)
			}
			return req.Inputs, nil
		},
		delete: func(ctx context.Context, c *tailscale.Client, req p.DeleteRequest) error {
			device := getString(req.Properties, "deviceId")
			if device == "" {
				device = req.ID
			}
			err := c.Devices().SetSubnetRoutes(ctx, device, []string{})
			if err != nil && !tailscale.IsNotFound(err) {
				return apiError("disabling the routes of device "+device, err)
			}
			return nil
		},
	}
}

// ---- tailscale:index/acl:Acl ----
//
// As the real provider (tailscale_acl): create sends the policy with
// If-Match "ts-default", so the API refuses (412) to overwrite a policy that
// is not the default, unless overwrite_existing_content (PR #303, issue #196:
// "You seem to be trying to overwrite a non-default ACL ... precondition
// failed, invalid old hash (412)"); update sets it; delete resets the policy
// to the default only with reset_acl_on_destroy, otherwise leaves it.

// defaultPolicy is Tailscale's default policy file: everyone reaches everything.
const defaultPolicy = `{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]}
  ]
}
`

func aclOps() resourceOps {
	return resourceOps{
		schema: acl,
		check: func(in property.Map) []p.CheckFailure {
			if s, ok := known(in, "acl"); ok && s.IsString() {
				if _, err := normalizePolicy(s.AsString()); err != nil {
					return []p.CheckFailure{{Property: "acl", Reason: "not JSON or HuJSON: " + err.Error()}}
				}
			}
			return nil
		},
		diff: func(req p.DiffRequest) (p.DiffResponse, error) {
			return diffInputs(acl, oldInputs(req), req.Inputs, map[string]func(a, b property.Value) bool{
				"acl": samePolicy,
			}), nil
		},
		create: func(ctx context.Context, c *tailscale.Client, in property.Map) (string, property.Map, error) {
			etag := `"ts-default"`
			if getBool(in, "overwriteExistingContent") {
				etag = ""
			}
			if err := c.PolicyFile().Set(ctx, getString(in, "acl"), etag); err != nil {
				if apiStatus(err) == http.StatusPreconditionFailed {
					return "", property.Map{}, fmt.Errorf("tailscale: refusing to overwrite the tailnet's policy file, which is not the default: "+
						"import it first or set overwriteExistingContent (%w)", apiError("setting the policy file", err))
				}
				return "", property.Map{}, apiError("setting the policy file", err)
			}
			return newID(), in, nil
		},
		read: func(ctx context.Context, c *tailscale.Client, req p.ReadRequest) (p.ReadResponse, error) {
			raw, err := c.PolicyFile().Raw(ctx)
			if err != nil {
				return p.ReadResponse{}, apiError("reading the policy file", err)
			}
			state := req.Properties
			if old, ok := known(state, "acl"); !ok || !samePolicy(old, property.New(raw.HuJSON)) {
				state = state.Set("acl", property.New(raw.HuJSON))
			}
			inputs := req.Inputs
			if inputs.Len() == 0 {
				inputs = state
			}
			return p.ReadResponse{ID: req.ID, Properties: state, Inputs: inputs}, nil
		},
		update: func(ctx context.Context, c *tailscale.Client, req p.UpdateRequest) (property.Map, error) {
			if !samePolicy(req.State.Get("acl"), req.Inputs.Get("acl")) {
				if err := c.PolicyFile().Set(ctx, getString(req.Inputs, "acl"), ""); err != nil {
					return property.Map{}, apiError("setting the policy file", err)
				}
			}
			return req.Inputs, nil
		},
		delete: func(ctx context.Context, c *tailscale.Client, req p.DeleteRequest) error {
			if !getBool(req.Properties, "resetAclOnDestroy") {
				return nil
			}
			if err := c.PolicyFile().Set(ctx, defaultPolicy, ""); err != nil {
				return apiError("resetting the policy file to the default", err)
			}
			return nil
		},
	}
}

// normalizePolicy: the policy as compact JSON with sorted keys, comments and
// trailing commas gone.
func normalizePolicy(s string) (string, error) {
	std, err := hujson.Standardize([]byte(s))
	if err != nil {
		return "", err
	}
	var v any
	if err := json.Unmarshal(std, &v); err != nil {
		return "", err
	}
	b, err := json.Marshal(v)
	return string(b), err
}

func samePolicy(a, b property.Value) bool {
	if !a.IsString() || !b.IsString() {
		return false
	}
	na, errA := normalizePolicy(a.AsString())
	nb, errB := normalizePolicy(b.AsString())
	if errA != nil || errB != nil {
		return a.AsString() == b.AsString()
	}
	return na == nb
}

// ---- invokes ----

// invokeGetDevice: the device with the given name or hostname, polled once
// a second until found or waitFor has elapsed.
func invokeGetDevice(ctx context.Context, c *tailscale.Client, args property.Map) (p.InvokeResponse, error) {
	name, hostname := getString(args, "name"), getString(args, "hostname")
	if (name == "") == (hostname == "") {
		return p.InvokeResponse{Failures: []p.CheckFailure{{Property: "name", Reason: "exactly one of name and hostname must be set"}}}, nil
	}
	var wait time.Duration
	if w := getString(args, "waitFor"); w != "" {
		d, err := time.ParseDuration(w)
		if err != nil {
			return p.InvokeResponse{Failures: []p.CheckFailure{{Property: "waitFor", Reason: err.Error()}}}, nil
		}
		wait = d
	}
	deadline := time.Now().Add(wait)
	for {
		devices, err := c.Devices().List(ctx)
		if err != nil {
			return p.InvokeResponse{}, apiError("listing the tailnet's devices", err)
		}
		for _, d := range devices {
			if (name != "" && d.Name == name) || (hostname != "" && d.Hostname == hostname) {
				return p.InvokeResponse{Return: deviceResult(d, args)}, nil
			}
		}
		if !time.Now().Before(deadline) {
			what := "name " + name
			if hostname != "" {
				what = "hostname " + hostname
			}
			if wait > 0 {
				return p.InvokeResponse{}, fmt.Errorf("tailscale: getDevice: no device with %s in the tailnet after waiting %s", what, wait)
			}
			return p.InvokeResponse{}, fmt.Errorf("tailscale: getDevice: no device with %s in the tailnet", what)
		}
		select {
		case <-ctx.Done():
			return p.InvokeResponse{}, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func deviceResult(d tailscale.Device, args property.Map) property.Map {
	lastSeen := ""
	if d.LastSeen != nil {
		lastSeen = rfc3339(d.LastSeen.Time)
	}
	out := map[string]property.Value{
		"id":                        property.New(d.ID),
		"nodeId":                    property.New(d.NodeID),
		"name":                      property.New(d.Name),
		"hostname":                  property.New(d.Hostname),
		"addresses":                 stringList(nonNil(d.Addresses)),
		"authorized":                property.New(d.Authorized),
		"blocksIncomingConnections": property.New(d.BlocksIncomingConnections),
		"clientVersion":             property.New(d.ClientVersion),
		"created":                   property.New(rfc3339(d.Created.Time)),
		"expires":                   property.New(rfc3339(d.Expires.Time)),
		"isExternal":                property.New(d.IsExternal),
		"keyExpiryDisabled":         property.New(d.KeyExpiryDisabled),
		"lastSeen":                  property.New(lastSeen),
		"machineKey":                property.New(d.MachineKey),
		"nodeKey":                   property.New(d.NodeKey),
		"os":                        property.New(d.OS),
		"tags":                      stringList(nonNil(d.Tags)),
		"tailnetLockError":          property.New(d.TailnetLockError),
		"tailnetLockKey":            property.New(d.TailnetLockKey),
		"updateAvailable":           property.New(d.UpdateAvailable),
		"user":                      property.New(d.User),
	}
	if w := getString(args, "waitFor"); w != "" {
		out["waitFor"] = property.New(w)
	}
	return property.NewMap(out)
}

// invokeGetACL: the policy file as HuJSON (as stored) and as JSON.
func invokeGetACL(ctx context.Context, c *tailscale.Client) (p.InvokeResponse, error) {
	raw, err := c.PolicyFile().Raw(ctx)
	if err != nil {
		return p.InvokeResponse{}, apiError("reading the policy file", err)
	}
	std, err := hujson.Standardize([]byte(raw.HuJSON))
	if err != nil {
		return p.InvokeResponse{}, fmt.Errorf("tailscale: getAcl: the policy file is not HuJSON: %w", err)
	}
	var indented bytes.Buffer
	if err := json.Indent(&indented, std, "", "  "); err != nil {
		return p.InvokeResponse{}, fmt.Errorf("tailscale: getAcl: %w", err)
	}
	id := c.Tailnet
	if id == "" {
		id = "-"
	}
	return p.InvokeResponse{Return: property.NewMap(map[string]property.Value{
		"id":     property.New(id),
		"json":   property.New(indented.String()),
		"hujson": property.New(raw.HuJSON),
	})}, nil
}

// ---- helpers ----

func sameStringSet(a, b property.Value) bool {
	count := map[any]int{}
	as, aok := plain(a).([]any)
	bs, bok := plain(b).([]any)
	if !aok || !bok || len(as) != len(bs) {
		return false
	}
	for _, e := range as {
		count[e]++
	}
	for _, e := range bs {
		count[e]--
	}
	for _, n := range count {
		if n != 0 {
			return false
		}
	}
	return true
}

// inputsOf: the object's inputs within a state.
func inputsOf(o object, state property.Map) property.Map {
	out := map[string]property.Value{}
	for _, pr := range o.props {
		if v, ok := state.GetOk(pr.name); ok && pr.in {
			out[pr.name] = v
		}
	}
	return property.NewMap(out)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func newID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
