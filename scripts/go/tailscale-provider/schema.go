package main

import (
	"encoding/json"
	"sort"

	"github.com/pulumi/pulumi/pkg/v3/codegen/schema"
)

// The tokens and property names of the pinned pulumi-tailscale SDK (0.29.2:
// its tailnet_key.py, device_subnet_routes.py, acl.py, get_device.py,
// get_acl.py, provider.py and config/vars.py). One table serves the schema
// (GetSchema) and the provider's checks and diffs, so both see the same names.
const (
	tokenTailnetKey   = "tailscale:index/tailnetKey:TailnetKey"
	tokenSubnetRoutes = "tailscale:index/deviceSubnetRoutes:DeviceSubnetRoutes"
	tokenACL          = "tailscale:index/acl:Acl"
	tokenGetDevice    = "tailscale:index/getDevice:getDevice"
	tokenGetACL       = "tailscale:index/getAcl:getAcl"
)

// prop is one property. kind: string, boolean, integer or stringList.
type prop struct {
	name     string
	kind     string
	in       bool // an input (of a resource, function or the provider)
	required bool // a required input
	out      bool // an output (of a resource or function)
	optOut   bool // an output that may be absent
	secret   bool
	replace  bool     // a change of this input replaces the resource
	env      []string // environment variables that default it (provider config)
	desc     string
}

type object struct {
	token string
	desc  string
	props []prop
}

func (o object) prop(name string) (prop, bool) {
	for _, p := range o.props {
		if p.name == name {
			return p, true
		}
	}
	return prop{}, false
}

// The real provider (terraform-provider-tailscale) marks every tailnet_key
// argument ForceNew: a key cannot be changed, only replaced.
var tailnetKey = object{tokenTailnetKey, "A pre-authentication key of the tailnet.", []prop{
	{name: "reusable", kind: "boolean", in: true, out: true, replace: true, desc: "Indicates if the key is reusable or single-use."},
	{name: "ephemeral", kind: "boolean", in: true, out: true, replace: true, desc: "Indicates if the key is ephemeral."},
	{name: "preauthorized", kind: "boolean", in: true, out: true, replace: true, desc: "Whether devices joined with the key are authorized."},
	{name: "expiry", kind: "integer", in: true, out: true, replace: true, desc: "The expiry of the key in seconds."},
	{name: "tags", kind: "stringList", in: true, out: true, replace: true, desc: "Tags of the devices joined with the key."},
	{name: "description", kind: "string", in: true, out: true, replace: true, desc: "A description of the key."},
	{name: "recreateIfInvalid", kind: "string", in: true, out: true, optOut: true, replace: true, desc: "'always' or 'never': whether an invalid key is created again."},
	{name: "userId", kind: "string", in: true, out: true, replace: true, desc: "ID of the user who created this key."},
	{name: "key", kind: "string", out: true, secret: true, desc: "The authentication key."},
	{name: "createdAt", kind: "string", out: true, desc: "The creation timestamp of the key in RFC3339 format."},
	{name: "expiresAt", kind: "string", out: true, desc: "The expiry timestamp of the key in RFC3339 format."},
	{name: "invalid", kind: "boolean", out: true, desc: "Whether the key is invalid (expired, revoked or deleted)."},
}}

var subnetRoutes = object{tokenSubnetRoutes, "The subnet routes enabled for a device.", []prop{
	{name: "deviceId", kind: "string", in: true, required: true, out: true, replace: true, desc: "The device to set subnet routes for."},
	{name: "routes", kind: "stringList", in: true, required: true, out: true, desc: "The subnet routes that are enabled to be routed by a device."},
}}

var acl = object{tokenACL, "The tailnet policy file.", []prop{
	{name: "acl", kind: "string", in: true, required: true, out: true, desc: "The policy, JSON or HuJSON."},
	{name: "overwriteExistingContent", kind: "boolean", in: true, out: true, optOut: true, desc: "If true, a policy file that is not the default may be overwritten."},
	{name: "resetAclOnDestroy", kind: "boolean", in: true, out: true, optOut: true, desc: "If true, the policy file is reset to the default when this resource is destroyed."},
}}

var getDevice = object{tokenGetDevice, "A single device of the tailnet.", []prop{
	{name: "name", kind: "string", in: true, out: true, optOut: true, desc: "The full name of the device (hostname.domain.ts.net)."},
	{name: "hostname", kind: "string", in: true, out: true, optOut: true, desc: "The short hostname of the device."},
	{name: "waitFor", kind: "string", in: true, out: true, optOut: true, desc: "How long to retry, once a second, until the device is found."},
	{name: "id", kind: "string", out: true, desc: "The legacy id of the device."},
	{name: "nodeId", kind: "string", out: true, desc: "The preferred identifier of the device."},
	{name: "addresses", kind: "stringList", out: true, desc: "The device's tailnet addresses."},
	{name: "authorized", kind: "boolean", out: true},
	{name: "blocksIncomingConnections", kind: "boolean", out: true},
	{name: "clientVersion", kind: "string", out: true},
	{name: "created", kind: "string", out: true},
	{name: "expires", kind: "string", out: true},
	{name: "isExternal", kind: "boolean", out: true},
	{name: "keyExpiryDisabled", kind: "boolean", out: true},
	{name: "lastSeen", kind: "string", out: true},
	{name: "machineKey", kind: "string", out: true},
	{name: "nodeKey", kind: "string", out: true},
	{name: "os", kind: "string", out: true},
	{name: "tags", kind: "stringList", out: true},
	{name: "tailnetLockError", kind: "string", out: true},
	{name: "tailnetLockKey", kind: "string", out: true},
	{name: "updateAvailable", kind: "boolean", out: true},
	{name: "user", kind: "string", out: true},
}}

var getACL = object{tokenGetACL, "The tailnet policy file.", []prop{
	{name: "id", kind: "string", out: true},
	{name: "json", kind: "string", out: true, desc: "The policy file as JSON."},
	{name: "hujson", kind: "string", out: true, desc: "The policy file as HuJSON."},
}}

// The provider's configuration (provider.py, config/vars.py). The
// environment variables are the real provider's.
var providerConfig = object{"tailscale", "", []prop{
	{name: "apiKey", kind: "string", in: true, secret: true, env: []string{"TAILSCALE_API_KEY"}},
	{name: "tailnet", kind: "string", in: true, env: []string{"TAILSCALE_TAILNET"}},
	{name: "baseUrl", kind: "string", in: true, env: []string{"TAILSCALE_BASE_URL"}},
	{name: "oauthClientId", kind: "string", in: true, env: []string{"TAILSCALE_OAUTH_CLIENT_ID"}},
	{name: "oauthClientSecret", kind: "string", in: true, secret: true, env: []string{"TAILSCALE_OAUTH_CLIENT_SECRET"}},
	{name: "scopes", kind: "stringList", in: true},
	{name: "userAgent", kind: "string", in: true},
	{name: "audience", kind: "string", in: true},
	{name: "identityToken", kind: "string", in: true, secret: true},
	{name: "identityTokenEnvironmentVariableName", kind: "string", in: true},
}}

func typeSpec(kind string) schema.TypeSpec {
	if kind == "stringList" {
		return schema.TypeSpec{Type: "array", Items: &schema.TypeSpec{Type: "string"}}
	}
	return schema.TypeSpec{Type: kind}
}

func propSpec(p prop) schema.PropertySpec {
	s := schema.PropertySpec{TypeSpec: typeSpec(p.kind), Description: p.desc, Secret: p.secret}
	if len(p.env) > 0 {
		s.DefaultInfo = &schema.DefaultSpec{Environment: p.env}
	}
	if p.name == "baseUrl" {
		s.Default = defaultBaseURL
	}
	return s
}

// split returns the object's inputs, required inputs, outputs and required outputs.
func (o object) split() (in map[string]schema.PropertySpec, reqIn []string, out map[string]schema.PropertySpec, reqOut []string) {
	in, out = map[string]schema.PropertySpec{}, map[string]schema.PropertySpec{}
	for _, p := range o.props {
		if p.in {
			s := propSpec(p)
			s.ReplaceOnChanges = p.replace
			in[p.name] = s
			if p.required {
				reqIn = append(reqIn, p.name)
			}
		}
		if p.out {
			out[p.name] = propSpec(p)
			if !p.optOut {
				reqOut = append(reqOut, p.name)
			}
		}
	}
	sort.Strings(reqIn)
	sort.Strings(reqOut)
	return in, reqIn, out, reqOut
}

func resourceSpec(o object) schema.ResourceSpec {
	in, reqIn, out, reqOut := o.split()
	return schema.ResourceSpec{
		ObjectTypeSpec:  schema.ObjectTypeSpec{Description: o.desc, Type: "object", Properties: out, Required: reqOut},
		InputProperties: in,
		RequiredInputs:  reqIn,
	}
}

func functionSpec(o object) schema.FunctionSpec {
	in, reqIn, out, reqOut := o.split()
	return schema.FunctionSpec{
		Description: o.desc,
		Inputs:      &schema.ObjectTypeSpec{Type: "object", Properties: in, Required: reqIn},
		Outputs:     &schema.ObjectTypeSpec{Type: "object", Properties: out, Required: reqOut},
	}
}

// packageSchema is the plugin's schema at the given version.
func packageSchema(version string) ([]byte, error) {
	config := map[string]schema.PropertySpec{}
	providerIn := map[string]schema.PropertySpec{}
	for _, p := range providerConfig.props {
		config[p.name] = propSpec(p)
		providerIn[p.name] = propSpec(p)
	}
	spec := schema.PackageSpec{
		Name:        "tailscale",
		Version:     version,
		Description: "A stand-in of the Tailscale provider for tailscale-egress's tests: the tokens the program uses, against the Tailscale API v2.",
		Config:      schema.ConfigSpec{Variables: config},
		// As the bridged pulumi-tailscale's schema: the module of
		// "tailscale:index/tailnetKey:TailnetKey" is "index", not "index/tailnetKey".
		Meta: &schema.MetadataSpec{ModuleFormat: "(.*)(?:/[^/]*)"},
		Provider: schema.ResourceSpec{
			ObjectTypeSpec:  schema.ObjectTypeSpec{Type: "object", Properties: providerIn},
			InputProperties: providerIn,
		},
		Resources: map[string]schema.ResourceSpec{},
		Functions: map[string]schema.FunctionSpec{},
	}
	for _, r := range []object{tailnetKey, subnetRoutes, acl} {
		spec.Resources[r.token] = resourceSpec(r)
	}
	for _, f := range []object{getDevice, getACL} {
		spec.Functions[f.token] = functionSpec(f)
	}
	return json.MarshalIndent(spec, "", "  ")
}
