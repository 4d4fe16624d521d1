// The provider mapping shared by the plugin (main.go) and its schema
// generator (tfgen.go): both must see the same tokens and metadata.
package main

import (
	"context"
	_ "embed" // bridge-metadata.json, written by the tfgen step

	"github.com/hetznercloud/terraform-provider-hcloud/hcloud"
	pfbridge "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/pf/tfbridge"
	"github.com/pulumi/pulumi-terraform-bridge/v3/pkg/tfbridge"
	tks "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/tfbridge/tokens"
	shim "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/tfshim"
	shimv2 "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/tfshim/sdk-v2"
)

// version is set at link time to the pinned pulumi-hcloud SDK's version: the
// engine matches a program's resources to a plugin by it.
var version = "0.0.0-dev"

// metadata is empty for the tfgen build and tfgen's output for the plugin.
//
//go:embed bridge-metadata.json
var metadata []byte

func providerInfo() tfbridge.ProviderInfo {
	info := tfbridge.ProviderInfo{
		// hcloud is half SDKv2, half plugin framework: serve both as one.
		P: pfbridge.MuxShimWithPF(context.Background(),
			shimv2.NewProvider(hcloud.Provider()),
			hcloud.NewPluginProvider()),
		Name:         "hcloud",
		Description:  "Hetzner Cloud, bridged for tailscale-egress's tests.",
		GitHubOrg:    "hetznercloud",
		License:      "Apache-2.0",
		MetadataInfo: tfbridge.NewProviderMetadata(metadata),
		Version:      version,
		Resources:    map[string]*tfbridge.ResourceInfo{},
	}
	// Terraform ids that are not strings (hcloud's are integers) become strings,
	// as Pulumi ids are.
	info.P.ResourcesMap().Range(func(key string, value shim.Resource) bool {
		if id, ok := value.Schema().GetOk("id"); ok && id.Type() != shim.TypeString {
			info.Resources[key] = &tfbridge.ResourceInfo{
				Fields: map[string]*tfbridge.SchemaInfo{"id": {Type: "string"}},
			}
		}
		return true
	})
	// The published SDK's tokens: hcloud_server -> hcloud:index/server:Server.
	info.MustComputeTokens(tks.SingleModule("hcloud_", "index", tks.MakeStandard("hcloud")))
	info.SetAutonaming(255, "-")
	return info
}
