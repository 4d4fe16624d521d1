//go:build tfgen

// pulumi-tfgen-hcloud: writes the plugin's schema.json and
// bridge-metadata.json (`schema --skip-docs --out DIR`).
package main

import (
	pftfgen "github.com/pulumi/pulumi-terraform-bridge/v3/pkg/pf/tfgen"
)

func main() {
	pftfgen.MainWithMuxer("hcloud", providerInfo())
}
