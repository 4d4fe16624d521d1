// The benchmark's two halves (tools/bench_cluster.py): `probe load`, many
// clients at once from a pod, and `probe serve`, the HTTPS server they reach
// (run in the topology's "internet" namespace, so that the server is never
// what limits the figures).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

type loadResult struct {
	Check    string         `json:"check"`
	Target   string         `json:"target"`
	OK       bool           `json:"ok"`
	Proxy    string         `json:"proxy,omitempty"`
	Clients  int            `json:"clients"`
	Requests int            `json:"requests"`
	Failures int            `json:"failures"`
	Errors   map[string]int `json:"errors,omitempty"`
	Bytes    int64          `json:"bytes"`
	Elapsed  float64        `json:"elapsed_s"`
	MbitS    float64        `json:"mbit_s"`
	P50      float64        `json:"p50_ms"`
	P90      float64        `json:"p90_ms"`
	P99      float64        `json:"p99_ms"`
	Max      float64        `json:"max_ms"`
}

// maxErrorKinds bounds the distinct error texts reported; the rest count as "other".
const maxErrorKinds = 5

// load runs `clients` goroutines that start together, each making `requests`
// GETs one after the other, each on a fresh connection (and so a fresh proxy
// tunnel and TLS handshake), reading every body to the end. It prints one
// JSON line: wall time, aggregate throughput, latency percentiles of whole
// requests, failures. Exit 0 when no request failed.
func load(target, proxy, cacert string, clients, requests int, size int64, timeout time.Duration) int {
	r := loadResult{Check: "load", Target: target, Clients: clients, Requests: clients * requests}
	if clients < 1 || requests < 1 {
		fmt.Fprintln(os.Stderr, "probe load: -clients and -requests must be at least 1")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tmpl, client, via, err := clientFor(ctx, http.MethodGet, target, proxy, cacert)
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe load:", err)
		return 2
	}
	r.Proxy = via

	var (
		mu        sync.Mutex
		latencies []float64
		wg        sync.WaitGroup
	)
	var failures tally
	fail := failures.add
	one := func() {
		t := time.Now()
		n, err := get(client, tmpl.Clone(ctx), size)
		ms := float64(time.Since(t).Microseconds()) / 1000
		mu.Lock()
		r.Bytes += n
		mu.Unlock()
		if err != nil {
			fail(err)
			return
		}
		mu.Lock()
		latencies = append(latencies, ms)
		mu.Unlock()
	}
	start := make(chan struct{})
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range requests {
				one()
			}
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	r.Elapsed = time.Since(t0).Seconds()
	if r.Elapsed > 0 {
		r.MbitS = float64(r.Bytes) * 8 / r.Elapsed / 1e6
	}
	slices.Sort(latencies)
	r.P50, r.P90, r.P99 = percentile(latencies, 50), percentile(latencies, 90), percentile(latencies, 99)
	if len(latencies) > 0 {
		r.Max = latencies[len(latencies)-1]
	}
	r.Failures, r.Errors = failures.result()
	r.OK = r.Failures == 0
	_ = json.NewEncoder(os.Stdout).Encode(r)
	if !r.OK {
		return 1
	}
	return 0
}

// clientFor is the request to clone for each transfer, and a client that
// sends it through `proxy` (none, env, or a URL) trusting `cacert` too.
func clientFor(ctx context.Context, method, url, proxy, cacert string) (*http.Request, *http.Client, string, error) {
	tmpl, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, nil, "", err
	}
	tr, via, err := transport(tmpl, proxy, cacert)
	if err != nil {
		return nil, nil, "", err
	}
	return tmpl, &http.Client{Transport: tr}, via, nil
}

// tally counts failures by their text: at most maxErrorKinds texts, the rest as "other".
type tally struct {
	mu     sync.Mutex
	count  int
	errors map[string]int
}

func (t *tally) add(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.errors == nil {
		t.errors = map[string]int{}
	}
	t.count++
	msg := err.Error()
	if _, seen := t.errors[msg]; !seen && len(t.errors) >= maxErrorKinds {
		msg = "other"
	}
	t.errors[msg]++
}

// result is the count and the texts (nil when nothing failed).
func (t *tally) result() (int, map[string]int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.count, t.errors
}

// get makes one request and reads its body to the end: the bytes read, and an
// error for a transport error, a status other than 200 or a body of the wrong size.
func get(client *http.Client, req *http.Request, size int64) (int64, error) {
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	switch {
	case err != nil:
		return n, err
	case resp.StatusCode != http.StatusOK:
		return n, fmt.Errorf("HTTP %d", resp.StatusCode)
	case size > 0 && n != size:
		return n, fmt.Errorf("body of %d bytes, want %d", n, size)
	}
	return n, nil
}

// percentile of sorted values, nearest rank; 0 when there are none.
func percentile(sorted []float64, p int) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := (p*len(sorted)+99)/100 - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// serve answers HTTPS on addr: /bytes/N with N bytes, POST /sink by reading
// the body (probe stream's uploads), anything else with the
// client's address (as the topology's echo server's /ip). HTTP/1.1 only, as
// the clients speak it. It prints one JSON line once it listens.
func serve(addr, certFile, keyFile string) error {
	if certFile == "" || keyFile == "" {
		return errors.New("-cert and -key are required")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return err
	}
	chunk := make([]byte, 64<<10)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/bytes/", func(w http.ResponseWriter, req *http.Request) {
		n, err := strconv.ParseInt(strings.TrimPrefix(req.URL.Path, "/bytes/"), 10, 64)
		if err != nil || n < 0 || n > 16<<30 {
			http.Error(w, "want /bytes/<0..16GiB>", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		for n > 0 {
			k := min(n, int64(len(chunk)))
			if _, err := w.Write(chunk[:k]); err != nil {
				return
			}
			n -= k
		}
	})
	mux.HandleFunc("/sink", sink)
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		host, _, _ := net.SplitHostPort(req.RemoteAddr)
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, host)
	})
	srv := &http.Server{
		Handler:           mux,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){}, // no HTTP/2
		ReadHeaderTimeout: 30 * time.Second,
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	_ = json.NewEncoder(os.Stdout).Encode(result{Check: "serve", Target: ln.Addr().String(), OK: true})
	return srv.ServeTLS(ln, "", "")
}
