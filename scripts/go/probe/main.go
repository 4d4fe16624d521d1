// Command probe is the test workload's network client (image local/probe:1):
// one check per run, one JSON object on stdout, exit 0 when the check
// succeeded, 1 when it failed, 2 on bad usage. Standard library only, built
// static, so it runs as any uid in a distroless-like image.
//
//	probe http URL [-proxy URL|env] [-timeout 5s] [-cacert FILE]
//	probe tcp HOST:PORT [-timeout 5s]
//	probe udp HOST:PORT [-payload TEXT] [-timeout 5s]   (ok = a reply came back)
//	probe ping HOST [-timeout 5s]     (ICMP echo over SOCK_DGRAM: no capability)
//	probe dns NAME [-server IP:53] [-timeout 5s]
//	probe load URL [-proxy URL|env] [-cacert FILE] [-clients 1] [-requests 1] [-bytes 0] [-timeout 5s]
//	probe stream URL [-proxy URL|env] [-cacert FILE] [-direction down|up] [-streams 1] [-seconds 15s] [-skip 3s]
//	probe serve ADDR -cert FILE -key FILE    (the benchmark's HTTPS server, load.go)
//
// -proxy env reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY as Go does, then ALL_PROXY
// (curl's variable, e.g. socks5h://...); a socks5:// or socks5h:// proxy gets
// the host name, not an address (the proxy resolves it), like curl's socks5h.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
)

type result struct {
	Check   string   `json:"check"`
	Target  string   `json:"target"`
	OK      bool     `json:"ok"`
	Error   string   `json:"error,omitempty"`
	Status  int      `json:"status,omitempty"`
	Body    string   `json:"body,omitempty"`
	Proxy   string   `json:"proxy,omitempty"`
	Local   string   `json:"local,omitempty"`
	Remote  string   `json:"remote,omitempty"`
	Addrs   []string `json:"addrs,omitempty"`
	Reply   string   `json:"reply,omitempty"`
	Elapsed float64  `json:"elapsed_s"`
}

const maxBody = 4096

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	check, target := os.Args[1], os.Args[2]
	fs := flag.NewFlagSet(check, flag.ExitOnError)
	timeout := fs.Duration("timeout", 5*time.Second, "overall timeout")
	proxy := fs.String("proxy", "", "http: proxy URL, or env")
	cacert := fs.String("cacert", "", "http: extra CA certificate (PEM)")
	payload := fs.String("payload", "probe", "udp: datagram to send")
	server := fs.String("server", "", "dns: server IP:port (default: /etc/resolv.conf)")
	clients := fs.Int("clients", 1, "load: concurrent clients")
	requests := fs.Int("requests", 1, "load: requests per client, each on a fresh connection")
	size := fs.Int64("bytes", 0, "load: body size every response must have (0: any)")
	direction := fs.String("direction", "down", "stream: down (GET) or up (POST)")
	streams := fs.Int("streams", 1, "stream: concurrent transfers, each on its own connection")
	seconds := fs.Duration("seconds", 15*time.Second, "stream: how long the transfers run")
	skip := fs.Duration("skip", 3*time.Second, "stream: the start left out of the rate (slow start)")
	cert := fs.String("cert", "", "serve: TLS certificate (PEM)")
	key := fs.String("key", "", "serve: TLS key (PEM)")
	if err := fs.Parse(os.Args[3:]); err != nil {
		usage()
	}
	switch check {
	case "serve":
		if err := serve(target, *cert, *key); err != nil {
			fmt.Fprintln(os.Stderr, "probe serve:", err)
			os.Exit(1)
		}
		return
	case "load":
		os.Exit(load(target, *proxy, *cacert, *clients, *requests, *size, *timeout))
	case "stream":
		os.Exit(stream(target, *proxy, *cacert, *direction, *streams, *seconds, *skip))
	}
	r := result{Check: check, Target: target}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	var err error
	switch check {
	case "http":
		err = doHTTP(ctx, &r, *proxy, *cacert)
	case "tcp":
		err = doTCP(ctx, &r)
	case "udp":
		err = doUDP(ctx, &r, *payload)
	case "ping":
		err = doPing(ctx, &r)
	case "dns":
		err = doDNS(ctx, &r, *server)
	default:
		usage()
	}
	cancel()
	r.Elapsed = time.Since(start).Seconds()
	r.OK = err == nil
	if err != nil {
		r.Error = err.Error()
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
	if !r.OK {
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: probe http|tcp|udp|ping|dns|load|stream|serve TARGET [flags] (see the source header)")
	os.Exit(2)
}

// envProxy is Go's HTTP(S)_PROXY handling plus curl's ALL_PROXY.
func envProxy(req *http.Request) (*url.URL, error) {
	if u, err := http.ProxyFromEnvironment(req); u != nil || err != nil {
		return u, err
	}
	for _, k := range []string{"ALL_PROXY", "all_proxy"} {
		if v := os.Getenv(k); v != "" {
			return url.Parse(v)
		}
	}
	return nil, nil
}

func doHTTP(ctx context.Context, r *result, proxy, cacert string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.Target, nil)
	if err != nil {
		return err
	}
	tr, via, err := transport(req, proxy, cacert)
	if err != nil {
		return err
	}
	r.Proxy = via
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	r.Status = resp.StatusCode
	r.Body = string(body)
	if err != nil {
		return err
	}
	if resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return nil
}

// transport is a client of one connection per request (no keep-alive), through
// proxy ("", "env" or a URL) as req would go, trusting cacert on top of the
// system's roots; it returns the proxy used (redacted) for the report.
func transport(req *http.Request, proxy, cacert string) (*http.Transport, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	switch proxy {
	case "":
		tr.Proxy = nil
	case "env":
		tr.Proxy = envProxy
	default:
		u, err := url.Parse(proxy)
		if err != nil {
			return nil, "", fmt.Errorf("bad -proxy %q: %w", proxy, err)
		}
		tr.Proxy = http.ProxyURL(u)
	}
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return nil, "", err
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, "", fmt.Errorf("no certificate in %s", cacert)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	via := ""
	if tr.Proxy != nil {
		if u, _ := tr.Proxy(req); u != nil {
			via = u.Redacted()
			// Go sends the host name through socks5:// (the proxy resolves
			// it): what curl calls socks5h.
			if u.Scheme == "socks5h" {
				u2 := *u
				u2.Scheme = "socks5"
				tr.Proxy = http.ProxyURL(&u2)
			}
		}
	}
	return tr, via, nil
}

func doTCP(ctx context.Context, r *result) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", r.Target)
	if err != nil {
		return err
	}
	defer c.Close()
	r.Local, r.Remote = c.LocalAddr().String(), c.RemoteAddr().String()
	return nil
}

func doUDP(ctx context.Context, r *result, payload string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", r.Target)
	if err != nil {
		return err
	}
	defer c.Close()
	r.Local = c.LocalAddr().String()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte(payload)); err != nil {
		return err
	}
	buf := make([]byte, maxBody)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	r.Reply = string(buf[:n])
	return nil
}

// doPing sends one ICMP echo request over an unprivileged ICMP socket (what
// net.ipv4.ping_group_range allows, as containerd sets it for every pod).
func doPing(ctx context.Context, r *result) error {
	ips, err := net.DefaultResolver.LookupIP(ctx, "ip4", r.Target)
	if err != nil {
		return err
	}
	ip4 := ips[0].To4()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, syscall.IPPROTO_ICMP)
	if err != nil {
		return fmt.Errorf("ICMP socket: %w", err)
	}
	defer syscall.Close(fd)
	dl, _ := ctx.Deadline()
	tv := syscall.NsecToTimeval(time.Until(dl).Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	const seq = 1
	msg := []byte{8, 0, 0, 0, 0, 0, 0, seq, 't', 's', 'e'} // type 8 echo; id set by the kernel
	binary.BigEndian.PutUint16(msg[2:], checksum(msg))
	to := &syscall.SockaddrInet4{}
	copy(to.Addr[:], ip4)
	if err := syscall.Sendto(fd, msg, 0, to); err != nil {
		return fmt.Errorf("sendto: %w", err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := syscall.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, syscall.EAGAIN) {
				return errors.New("no echo reply before the timeout")
			}
			return fmt.Errorf("recvfrom: %w", err)
		}
		if n >= 8 && buf[0] == 0 && buf[7] == seq { // echo reply to our sequence
			if f, ok := from.(*syscall.SockaddrInet4); ok {
				r.Remote = net.IP(f.Addr[:]).String()
			}
			return nil
		}
	}
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = (s & 0xffff) + (s >> 16)
	}
	return ^uint16(s)
}

func doDNS(ctx context.Context, r *result, server string) error {
	res := &net.Resolver{PreferGo: true}
	if server != "" {
		res.Dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server)
		}
	}
	addrs, err := res.LookupHost(ctx, r.Target)
	r.Addrs = addrs
	if err == nil && len(addrs) == 0 {
		err = errors.New("no addresses")
	}
	if err != nil && strings.Contains(err.Error(), "no such host") {
		return fmt.Errorf("NXDOMAIN: %w", err)
	}
	return err
}
