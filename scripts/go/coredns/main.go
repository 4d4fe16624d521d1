// Command coredns is CoreDNS with only the plugins the test cluster's
// Corefile uses (k3s's Corefile, minus hosts, reload, prometheus and
// loadbalance): a smaller build than the full plugin set, same code.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins in the order of CoreDNS's plugin.cfg (the order they handle a
// query in, whatever the Corefile's order).
var directives = []string{"ready", "health", "errors", "cache", "kubernetes", "loop", "forward"}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
