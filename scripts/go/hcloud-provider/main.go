//go:build !tfgen

// pulumi-resource-hcloud: the Terraform hcloud provider, bridged to Pulumi,
// for the tests' real-engine runs against an emulated Hetzner Cloud API.
package main

import (
	"context"
	_ "embed" // schema.json, written by the tfgen step

	pfbridge "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/pf/tfbridge"
)

//go:embed schema.json
var schema []byte

func main() {
	pfbridge.MainWithMuxer(context.Background(), "hcloud", providerInfo(), schema)
}
