package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"

	p "github.com/pulumi/pulumi-go-provider"
	presource "github.com/pulumi/pulumi/sdk/v3/go/common/resource"
	"github.com/pulumi/pulumi/sdk/v3/go/property"
	tailscale "tailscale.com/client/tailscale/v2"
)

const defaultBaseURL = "https://api.tailscale.com"

// tsProvider holds the configured API client. The low-level p.Provider is
// used (not infer) so that each token is dispatched explicitly and matches
// the SDK's string exactly.
type tsProvider struct {
	version string
	mu      sync.Mutex
	client  *tailscale.Client
}

type resourceOps struct {
	schema object
	check  func(inputs property.Map) []p.CheckFailure
	diff   func(req p.DiffRequest) (p.DiffResponse, error)
	create func(ctx context.Context, c *tailscale.Client, inputs property.Map) (string, property.Map, error)
	read   func(ctx context.Context, c *tailscale.Client, req p.ReadRequest) (p.ReadResponse, error)
	update func(ctx context.Context, c *tailscale.Client, req p.UpdateRequest) (property.Map, error)
	delete func(ctx context.Context, c *tailscale.Client, req p.DeleteRequest) error
}

func (t *tsProvider) resources() map[string]resourceOps {
	return map[string]resourceOps{
		tokenTailnetKey:   tailnetKeyOps(),
		tokenSubnetRoutes: subnetRoutesOps(),
		tokenACL:          aclOps(),
	}
}

func newProvider(version string) p.Provider {
	t := &tsProvider{version: version}
	ops := t.resources()
	lookup := func(urn presource.URN) (resourceOps, error) {
		token := string(urn.Type())
		r, ok := ops[token]
		if !ok {
			return resourceOps{}, fmt.Errorf("tailscale: unknown resource type %q (this stand-in implements %s, %s, %s)",
				token, tokenTailnetKey, tokenSubnetRoutes, tokenACL)
		}
		return r, nil
	}
	return p.Provider{
		GetSchema: func(context.Context, p.GetSchemaRequest) (p.GetSchemaResponse, error) {
			s, err := packageSchema(version)
			return p.GetSchemaResponse{Schema: string(s)}, err
		},
		CheckConfig: func(_ context.Context, req p.CheckRequest) (p.CheckResponse, error) {
			failures := []p.CheckFailure{}
			for _, name := range checkTypes(providerConfig, req.Inputs) {
				if name == "scopes" && getString(req.Inputs, name) != "" {
					continue // the Python SDK sends a list as JSON text
				}
				failures = append(failures, p.CheckFailure{Property: name, Reason: "wrong type"})
			}
			if u := getString(req.Inputs, "baseUrl"); u != "" {
				if parsed, err := url.Parse(u); err != nil || parsed.Scheme == "" || parsed.Host == "" {
					failures = append(failures, p.CheckFailure{Property: "baseUrl", Reason: fmt.Sprintf("not an absolute URL: %q", u)})
				}
			}
			return p.CheckResponse{Inputs: req.Inputs, Failures: failures}, nil
		},
		DiffConfig: func(_ context.Context, req p.DiffRequest) (p.DiffResponse, error) {
			return diffInputs(providerConfig, oldInputs(req), req.Inputs, nil), nil
		},
		Configure: func(_ context.Context, req p.ConfigureRequest) error {
			c, err := newClient(req.Args)
			if err != nil {
				return err
			}
			t.mu.Lock()
			t.client = c
			t.mu.Unlock()
			return nil
		},
		Invoke: func(ctx context.Context, req p.InvokeRequest) (p.InvokeResponse, error) {
			c, err := t.get()
			if err != nil {
				return p.InvokeResponse{}, err
			}
			switch string(req.Token) {
			case tokenGetDevice:
				return invokeGetDevice(ctx, c, req.Args)
			case tokenGetACL:
				return invokeGetACL(ctx, c)
			}
			return p.InvokeResponse{}, fmt.Errorf("tailscale: unknown function %q (this stand-in implements %s, %s)",
				req.Token, tokenGetDevice, tokenGetACL)
		},
		Check: func(_ context.Context, req p.CheckRequest) (p.CheckResponse, error) {
			r, err := lookup(req.Urn)
			if err != nil {
				return p.CheckResponse{}, err
			}
			failures := []p.CheckFailure{}
			for _, name := range checkTypes(r.schema, req.Inputs) {
				failures = append(failures, p.CheckFailure{Property: name, Reason: "wrong type"})
			}
			for _, pr := range r.schema.props {
				if pr.required {
					if v, ok := req.Inputs.GetOk(pr.name); !ok || v.IsNull() {
						failures = append(failures, p.CheckFailure{Property: pr.name, Reason: "missing required property"})
					}
				}
			}
			if r.check != nil {
				failures = append(failures, r.check(req.Inputs)...)
			}
			return p.CheckResponse{Inputs: req.Inputs, Failures: failures}, nil
		},
		Diff: func(_ context.Context, req p.DiffRequest) (p.DiffResponse, error) {
			r, err := lookup(req.Urn)
			if err != nil {
				return p.DiffResponse{}, err
			}
			return r.diff(req)
		},
		Create: func(ctx context.Context, req p.CreateRequest) (p.CreateResponse, error) {
			r, err := lookup(req.Urn)
			if err != nil {
				return p.CreateResponse{}, err
			}
			if req.DryRun {
				return p.CreateResponse{Properties: previewOutputs(r.schema, req.Properties)}, nil
			}
			c, err := t.get()
			if err != nil {
				return p.CreateResponse{}, err
			}
			id, props, err := r.create(ctx, c, req.Properties)
			return p.CreateResponse{ID: id, Properties: props}, err
		},
		Read: func(ctx context.Context, req p.ReadRequest) (p.ReadResponse, error) {
			r, err := lookup(req.Urn)
			if err != nil {
				return p.ReadResponse{}, err
			}
			c, err := t.get()
			if err != nil {
				return p.ReadResponse{}, err
			}
			return r.read(ctx, c, req)
		},
		Update: func(ctx context.Context, req p.UpdateRequest) (p.UpdateResponse, error) {
			r, err := lookup(req.Urn)
			if err != nil {
				return p.UpdateResponse{}, err
			}
			if req.DryRun {
				return p.UpdateResponse{Properties: previewUpdate(r.schema, req.State, req.Inputs)}, nil
			}
			if r.update == nil {
				return p.UpdateResponse{}, fmt.Errorf("tailscale: %s is never updated in place, only replaced", r.schema.token)
			}
			c, err := t.get()
			if err != nil {
				return p.UpdateResponse{}, err
			}
			props, err := r.update(ctx, c, req)
			return p.UpdateResponse{Properties: props}, err
		},
		Delete: func(ctx context.Context, req p.DeleteRequest) error {
			r, err := lookup(req.Urn)
			if err != nil {
				return err
			}
			c, err := t.get()
			if err != nil {
				return err
			}
			return r.delete(ctx, c, req)
		},
	}
}

func (t *tsProvider) get() (*tailscale.Client, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.client == nil {
		return nil, errors.New("tailscale: the provider is not configured")
	}
	return t.client, nil
}

// configValue is the provider argument, else the first of its environment
// variables that is set.
func configValue(args property.Map, name string) string {
	if s := getString(args, name); s != "" {
		return s
	}
	pr, _ := providerConfig.prop(name)
	for _, env := range pr.env {
		if s := os.Getenv(env); s != "" {
			return s
		}
	}
	return ""
}

// newClient builds the API client from the provider's configuration: an API
// key, or an OAuth client's credentials through the client's OAuth support.
func newClient(args property.Map) (*tailscale.Client, error) {
	base := configValue(args, "baseUrl")
	if base == "" {
		base = defaultBaseURL
	}
	baseURL, err := url.Parse(base)
	if err != nil || baseURL.Scheme == "" || baseURL.Host == "" {
		return nil, fmt.Errorf("tailscale: baseUrl %q is not an absolute URL", base)
	}
	if getString(args, "identityToken") != "" || getString(args, "identityTokenEnvironmentVariableName") != "" {
		return nil, errors.New("tailscale: identityToken (workload identity federation) is not supported by this stand-in; use apiKey or oauthClientId/oauthClientSecret")
	}
	c := &tailscale.Client{
		BaseURL:   baseURL,
		Tailnet:   configValue(args, "tailnet"),
		UserAgent: getString(args, "userAgent"),
		HTTP:      &http.Client{Transport: statusTransport{http.DefaultTransport}},
	}
	apiKey := configValue(args, "apiKey")
	if path, ok := strings.CutPrefix(apiKey, "file:"); ok {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("tailscale: apiKey: %w", err)
		}
		apiKey = strings.TrimSpace(string(b))
	}
	id, secret := configValue(args, "oauthClientId"), configValue(args, "oauthClientSecret")
	switch {
	case apiKey != "" && (id != "" || secret != ""):
		return nil, errors.New("tailscale: apiKey conflicts with oauthClientId/oauthClientSecret: set one or the other")
	case apiKey != "":
		c.APIKey = apiKey
	case id != "" && secret != "":
		c.Auth = &tailscale.OAuth{ClientID: id, ClientSecret: secret, Scopes: scopes(args)}
	case id != "" || secret != "":
		return nil, errors.New("tailscale: oauthClientId and oauthClientSecret must both be set")
	default:
		return nil, p.ConfigMissingKeys(map[string]string{
			"tailscale:apiKey": "a Tailscale API key (or TAILSCALE_API_KEY), or tailscale:oauthClientId and tailscale:oauthClientSecret",
		})
	}
	return c, nil
}

// scopes: a list, or the JSON text of one (what the Python SDK sends).
func scopes(args property.Map) []string {
	if s := getString(args, "scopes"); s != "" {
		var out []string
		if json.Unmarshal([]byte(s), &out) == nil {
			return out
		}
	}
	return getStrings(args, "scopes")
}

// statusTransport gives every error answer a JSON body with a message, so
// that the client reports its HTTP status even when the body was plain text
// (the client decodes error bodies as JSON and loses the status otherwise).
type statusTransport struct{ next http.RoundTripper }

func (s statusTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := s.next.RoundTrip(req)
	if err != nil || resp.StatusCode < 400 {
		return resp, err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	var probe struct {
		Message *string `json:"message"`
	}
	if json.Unmarshal(body, &probe) != nil || probe.Message == nil {
		msg := strings.TrimSpace(string(body))
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		body, _ = json.Marshal(map[string]string{"message": msg})
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	return resp, nil
}

// apiError is a diagnostic naming the operation, the HTTP status and the API's message.
func apiError(op string, err error) error {
	var e tailscale.APIError
	if errors.As(err, &e) {
		return fmt.Errorf("tailscale: %s: the Tailscale API answered HTTP %d: %s", op, e.Status, e.Message)
	}
	return fmt.Errorf("tailscale: %s: %w", op, err)
}

func apiStatus(err error) int {
	var e tailscale.APIError
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

func oldInputs(req p.DiffRequest) property.Map {
	if req.OldInputs.Len() > 0 {
		return req.OldInputs
	}
	return req.State
}

// diffInputs compares old and new inputs property by property; equal, if
// given, decides equality for a property (else plain equality).
func diffInputs(o object, old, news property.Map, equal map[string]func(a, b property.Value) bool) p.DiffResponse {
	detailed := map[string]p.PropertyDiff{}
	for _, pr := range o.props {
		if !pr.in {
			continue
		}
		a, b := old.Get(pr.name), news.Get(pr.name)
		same := reflect.DeepEqual(plain(a), plain(b)) && !b.IsComputed()
		if eq, ok := equal[pr.name]; ok && !a.IsNull() && !b.IsNull() && !b.IsComputed() {
			same = eq(a, b)
		}
		if same {
			continue
		}
		kind := p.Update
		switch {
		case a.IsNull():
			kind = p.Add
		case b.IsNull():
			kind = p.Delete
		}
		if pr.replace {
			kind = map[p.DiffKind]p.DiffKind{p.Update: p.UpdateReplace, p.Add: p.AddReplace, p.Delete: p.DeleteReplace}[kind]
		}
		detailed[pr.name] = p.PropertyDiff{Kind: kind, InputDiff: true}
	}
	return p.DiffResponse{HasChanges: len(detailed) > 0, DetailedDiff: detailed}
}

// previewOutputs: the inputs, and every output the API computes unknown.
func previewOutputs(o object, inputs property.Map) property.Map {
	out := inputs.AsMap()
	for _, pr := range o.props {
		if _, ok := out[pr.name]; !ok && pr.out && !pr.optOut {
			out[pr.name] = property.New(property.Computed)
		}
	}
	return property.NewMap(out)
}

func previewUpdate(o object, state, inputs property.Map) property.Map {
	out := state.AsMap()
	for k, v := range inputs.All {
		out[k] = v
	}
	for _, pr := range o.props {
		if pr.in {
			if _, ok := inputs.GetOk(pr.name); !ok {
				delete(out, pr.name)
			}
		}
	}
	return property.NewMap(out)
}
