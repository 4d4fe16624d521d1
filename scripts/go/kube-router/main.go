// Command kube-router-netpol runs kube-router's NetworkPolicy controller, and
// only that, the way k3s embeds it (k3s pkg/agent/netpol/netpol.go): k3s does
// not run the kube-router binary, it calls the controller of its fork
// github.com/k3s-io/kube-router/v2 (module path
// github.com/cloudnativelabs/kube-router/v2) with the router and the service
// proxy off. This main does the same for the test cluster of issue 9, so the
// NetworkPolicies there are enforced by the code Rancher Desktop runs.
//
// Flags are kube-router's own (--kubeconfig, --hostname-override,
// --service-cluster-ip-range, --nodeport-range, --iptables-sync-period, -v...);
// --run-router and --run-service-proxy must be false, --run-firewall true.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudnativelabs/kube-router/v2/pkg/controllers/netpol"
	"github.com/cloudnativelabs/kube-router/v2/pkg/healthcheck"
	"github.com/cloudnativelabs/kube-router/v2/pkg/options"
	"github.com/cloudnativelabs/kube-router/v2/pkg/utils"
	"github.com/cloudnativelabs/kube-router/v2/pkg/version"
	"github.com/spf13/pflag"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kube-router-netpol: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	klog.InitFlags(nil)
	cfg := options.NewKubeRouterConfig()
	cfg.AddFlags(pflag.CommandLine)
	pflag.Parse()
	if err := flag.Set("logtostderr", "true"); err != nil {
		return err
	}
	if err := flag.Set("v", cfg.VLevel); err != nil {
		return err
	}
	if cfg.Version {
		version.PrintVersion(false)
		return nil
	}
	// k3s runs the firewall only: routing is flannel's, services kube-proxy's.
	if !cfg.RunFirewall || cfg.RunRouter || cfg.RunServiceProxy || cfg.RunLoadBalancer {
		return errors.New("firewall only: pass --run-firewall=true --run-router=false --run-service-proxy=false")
	}
	if cfg.Kubeconfig == "" || cfg.HostnameOverride == "" {
		return errors.New("--kubeconfig and --hostname-override (the node name) are required")
	}
	// As k3s: the node-port range in iptables' "a:b" form, metrics off (k3s
	// routes them into its own registry; nothing scrapes them here).
	cfg.NodePortRange = strings.ReplaceAll(cfg.NodePortRange, "-", ":")
	cfg.MetricsEnabled = false

	// As k3s: without a working ipset there is nothing to enforce with.
	set, err := utils.NewIPSet(false)
	if err != nil {
		return fmt.Errorf("ipset unavailable: %w", err)
	}
	if err := set.Save(); err != nil {
		return fmt.Errorf("ipset save failed: %w", err)
	}

	restConfig, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// As k3s: the controller reads the node's addresses from its Node object;
	// wait (at most a minute) until the kubelet has registered it.
	if err := wait.PollUntilContextTimeout(ctx, 2*time.Second, 60*time.Second, true,
		func(ctx context.Context) (bool, error) {
			node, err := client.CoreV1().Nodes().Get(ctx, cfg.HostnameOverride, metav1.GetOptions{})
			if err != nil {
				klog.Errorf("getting node %s: %v", cfg.HostnameOverride, err)
				return false, nil
			}
			return len(node.Status.Addresses) > 0, nil
		}); err != nil {
		return fmt.Errorf("node %s has no addresses: %w", cfg.HostnameOverride, err)
	}

	stopCh := ctx.Done()
	informerFactory := informers.NewSharedInformerFactory(client, 0)
	podInformer := informerFactory.Core().V1().Pods().Informer()
	nsInformer := informerFactory.Core().V1().Namespaces().Informer()
	npInformer := informerFactory.Networking().V1().NetworkPolicies().Informer()
	informerFactory.Start(stopCh)
	informerFactory.WaitForCacheSync(stopCh)

	iptablesHandlers, ipSetHandlers, err := netpol.NewIPTablesHandlers(cfg)
	if err != nil {
		return fmt.Errorf("iptables handlers: %w", err)
	}

	// The controller sends heartbeats; k3s runs only the health check loop
	// (no HTTP server) to consume them.
	healthCh := make(chan *healthcheck.ControllerHeartbeat, 10)
	hc, err := healthcheck.NewHealthController(cfg)
	if err != nil {
		return err
	}
	hc.SetAlive()
	var wg sync.WaitGroup
	wg.Add(1)
	go hc.RunCheck(healthCh, stopCh, &wg)

	npc, err := netpol.NewNetworkPolicyController(client, cfg, podInformer, npInformer, nsInformer,
		&sync.Mutex{}, nil, iptablesHandlers, ipSetHandlers)
	if err != nil {
		return fmt.Errorf("network policy controller: %w", err)
	}
	if _, err := podInformer.AddEventHandler(npc.PodEventHandler); err != nil {
		return err
	}
	if _, err := nsInformer.AddEventHandler(npc.NamespaceEventHandler); err != nil {
		return err
	}
	if _, err := npInformer.AddEventHandler(npc.NetworkPolicyEventHandler); err != nil {
		return err
	}

	klog.Infof("starting kube-router network policy controller %s (%s) for node %s",
		version.Version, runtime.Version(), cfg.HostnameOverride)
	wg.Add(1)
	go npc.Run(healthCh, stopCh, &wg)

	<-stopCh
	klog.Info("stopping")
	wg.Wait()
	return nil
}
