// pulumi-resource-tailscale: a test-only stand-in of the Tailscale provider
// plugin for tailscale-egress's real-engine tests (issue 18). It implements
// exactly the tokens the program uses, with the pinned pulumi-tailscale
// SDK's token strings and property names, against the Tailscale API v2 as
// tailscale.com/client/tailscale/v2 calls it. Not the real provider: that
// one (pulumi-tailscale's provider module, terraform-provider-tailscale) is
// not served by the Go module proxy.
package main

import (
	"context"
	"fmt"
	"os"

	p "github.com/pulumi/pulumi-go-provider"
)

// version is set at link time to the pinned pulumi-tailscale SDK's version:
// the engine runs the plugin whose version the SDK asks for.
var version = "0.0.0-dev"

func main() {
	if len(os.Args) == 2 && os.Args[1] == "--schema" {
		// The build writes schema.json beside the plugin from this.
		s, err := packageSchema(version)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(string(s))
		return
	}
	if err := p.RunProvider(context.Background(), "tailscale", version, newProvider(version)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
