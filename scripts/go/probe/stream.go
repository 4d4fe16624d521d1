package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type streamResult struct {
	Check     string         `json:"check"`
	Target    string         `json:"target"`
	OK        bool           `json:"ok"`
	Proxy     string         `json:"proxy,omitempty"`
	Direction string         `json:"direction"`
	Streams   int            `json:"streams"`
	Seconds   float64        `json:"seconds"`
	Skip      float64        `json:"skip"`
	Bytes     int64          `json:"bytes"`
	MbitS     float64        `json:"mbit_s"`
	Failures  int            `json:"failures"`
	Errors    map[string]int `json:"errors,omitempty"`
}

// counter counts the bytes that pass through it.
type counter struct {
	n    *atomic.Int64
	read func([]byte) (int, error)
}

func (c counter) Read(p []byte) (int, error) {
	k, err := c.read(p)
	c.n.Add(int64(k))
	return k, err
}

// stream runs `streams` long transfers at once for `seconds`, each on its own
// connection (and so its own proxy tunnel): "down" GETs base/bytes/16GiB and
// reads it, "up" POSTs an endless body to base/sink. Bytes are counted as
// they move; the figure is the rate between `skip` (slow start left out) and
// `seconds`. One JSON line; exit 0 when no stream failed before the end.
func stream(base, proxy, cacert, direction string, streams int, seconds, skip time.Duration) int {
	r := streamResult{Check: "stream", Target: base, Direction: direction, Streams: streams,
		Seconds: seconds.Seconds(), Skip: skip.Seconds()}
	if streams < 1 || skip >= seconds || (direction != "down" && direction != "up") {
		fmt.Fprintln(os.Stderr, "probe stream: -direction down|up, -streams >= 1, -skip < -seconds")
		return 2
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	url := strings.TrimSuffix(base, "/") + "/bytes/17179869184"
	method := http.MethodGet
	if direction == "up" {
		url, method = strings.TrimSuffix(base, "/")+"/sink", http.MethodPost
	}
	tmpl, client, via, err := clientFor(ctx, method, url, proxy, cacert)
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe stream:", err)
		return 2
	}
	r.Proxy = via
	var moved atomic.Int64
	var failures tally
	fail := func(err error) {
		if ctx.Err() == nil { // after the end of the cell, not a failure
			failures.add(err)
		}
	}
	chunk := make([]byte, 64<<10)
	var wg sync.WaitGroup
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := tmpl.Clone(ctx)
			if direction == "up" {
				body := counter{n: &moved, read: func(p []byte) (int, error) {
					if ctx.Err() != nil {
						return 0, io.EOF
					}
					return copy(p, chunk), nil
				}}
				req.Body, req.ContentLength = io.NopCloser(body), -1
			}
			resp, err := client.Do(req)
			if err != nil {
				fail(err)
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				fail(fmt.Errorf("HTTP %d", resp.StatusCode))
				return
			}
			if direction == "down" {
				if _, err := io.Copy(io.Discard, counter{n: &moved, read: resp.Body.Read}); err != nil {
					fail(err)
				}
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
		}()
	}
	time.Sleep(skip)
	from := moved.Load()
	time.Sleep(seconds - skip)
	r.Bytes = moved.Load() - from
	r.MbitS = float64(r.Bytes) * 8 / (seconds - skip).Seconds() / 1e6
	cancel()
	wg.Wait()
	r.Failures, r.Errors = failures.result()
	r.OK = r.Failures == 0 && r.Bytes > 0
	_ = json.NewEncoder(os.Stdout).Encode(r)
	if !r.OK {
		return 1
	}
	return 0
}

// sink reads an upload to its end (or until the client stops): the bytes read.
func sink(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		http.Error(w, "POST a body", http.StatusMethodNotAllowed)
		return
	}
	n, err := io.Copy(io.Discard, req.Body)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return
	}
	fmt.Fprintln(w, n)
}
