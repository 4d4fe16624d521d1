// Command wanlink is the WAN bench's link (make bench-wan): two TAP devices
// joined in user space, each direction shaped the way tc's netem and tbf
// shape a link: a rate (serialization at the bottleneck, a tail-drop queue of
// -queue worth of it), a one-way delay, and optionally random loss and
// reordering. This machine's kernel has tbf but neither netem nor fq
// (CONFIG_NET_SCH_NETEM and CONFIG_NET_SCH_FQ are off: `tc qdisc add ...
// netem` says "Specified qdisc kind is unknown"), so a delay cannot be made in
// its kernel.
//
//	wanlink -a wanA -b wanB -rate 250mbit -delay 20ms [-loss 0.1] [-reorder 1] [-queue 50ms] [-seed 1] [-shape FILE]
//
// With -shape, SIGHUP reshapes the link from FILE, which holds the same
// flags (e.g. "-rate=50mbit -delay=5ms -loss=0 -reorder=0"): a bench moves
// from one profile to the next without taking the link down.
//
// Both devices must exist in the current network namespace (`ip tuntap add
// dev wanA mode tap`); they keep working when moved to other namespaces
// afterwards. Frames reach user space whole: without IFF_VNET_HDR the kernel
// segments and checksums them first, as for a NIC without offloads. It prints
// "ready" once both are attached and, on SIGTERM or SIGINT, one JSON line of
// counters per direction.
package main

import (
	"container/heap"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const maxFrame = 65536

type shape struct {
	bitsPerSecond float64
	delay         time.Duration
	queue         time.Duration
	lossPercent   float64
	reorderPct    float64
}

// packet is a frame waiting for its release time.
type packet struct {
	release time.Time
	seq     uint64
	frame   []byte
}

type queue []*packet

func (q queue) Len() int { return len(q) }
func (q queue) Less(i, j int) bool {
	if q[i].release.Equal(q[j].release) {
		return q[i].seq < q[j].seq
	}
	return q[i].release.Before(q[j].release)
}
func (q queue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *queue) Push(x any)   { *q = append(*q, x.(*packet)) }
func (q *queue) Pop() any {
	old := *q
	p := old[len(old)-1]
	*q = old[:len(old)-1]
	return p
}

// direction carries frames from one device to the other.
type direction struct {
	name      string
	in, out   *os.File
	shape     shape
	rng       *rand.Rand
	mu        sync.Mutex
	pending   queue
	wake      chan struct{}
	seq       uint64
	busyUntil time.Time // when the bottleneck has sent what it holds

	Forwarded atomic.Uint64 `json:"-"`
	Bytes     atomic.Uint64 `json:"-"`
	Lost      atomic.Uint64 `json:"-"`
	Dropped   atomic.Uint64 `json:"-"`
	Reordered atomic.Uint64 `json:"-"`
}

func (d *direction) admit(frame []byte, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.shape.lossPercent > 0 && d.rng.Float64()*100 < d.shape.lossPercent {
		d.Lost.Add(1)
		return
	}
	start := now
	if d.busyUntil.After(now) {
		start = d.busyUntil
	}
	// Tail drop: the bottleneck's queue holds at most -queue of sending time.
	if start.Sub(now) > d.shape.queue {
		d.Dropped.Add(1)
		return
	}
	sent := start
	if d.shape.bitsPerSecond > 0 {
		sent = start.Add(time.Duration(float64(len(frame)*8) / d.shape.bitsPerSecond * float64(time.Second)))
	}
	d.busyUntil = sent
	release := sent.Add(d.shape.delay)
	// netem's reorder: this share of packets skips the delay, so it
	// overtakes the ones still in flight.
	if d.shape.reorderPct > 0 && d.rng.Float64()*100 < d.shape.reorderPct {
		release = sent
		d.Reordered.Add(1)
	}
	d.seq++
	heap.Push(&d.pending, &packet{release: release, seq: d.seq, frame: frame})
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func (d *direction) read() {
	buf := make([]byte, maxFrame)
	for {
		n, err := d.in.Read(buf)
		if err != nil {
			fmt.Fprintf(os.Stderr, "wanlink %s: read: %v\n", d.name, err)
			os.Exit(1)
		}
		// A copy of the frame's size: a queue of full-size buffers would cost
		// the machine the CPU (allocation, GC) the bench is measuring.
		d.admit(append([]byte(nil), buf[:n]...), time.Now())
	}
}

func (d *direction) write() {
	timer := time.NewTimer(time.Hour)
	for {
		d.mu.Lock()
		var due []*packet
		now := time.Now()
		var next time.Duration = time.Hour
		for d.pending.Len() > 0 {
			head := d.pending[0]
			if wait := head.release.Sub(now); wait > 0 {
				next = wait
				break
			}
			due = append(due, heap.Pop(&d.pending).(*packet))
		}
		d.mu.Unlock()
		for _, p := range due {
			if _, err := d.out.Write(p.frame); err == nil {
				d.Forwarded.Add(1)
				d.Bytes.Add(uint64(len(p.frame)))
			}
		}
		if len(due) > 0 {
			continue
		}
		timer.Reset(next)
		select {
		case <-timer.C:
		case <-d.wake:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		}
	}
}

func (d *direction) reshape(s shape) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.shape = s
}

func (d *direction) counters() map[string]any {
	return map[string]any{
		"direction": d.name, "forwarded": d.Forwarded.Load(), "bytes": d.Bytes.Load(),
		"lost": d.Lost.Load(), "dropped": d.Dropped.Load(), "reordered": d.Reordered.Load(),
	}
}

// openTap attaches to the existing TAP device `name` (no packet information
// header, no virtio-net header: whole frames).
func openTap(name string) (*os.File, error) {
	fd, err := syscall.Open("/dev/net/tun", syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	var ifr [40]byte
	copy(ifr[:16], name)
	*(*uint16)(unsafe.Pointer(&ifr[16])) = syscall.IFF_TAP | syscall.IFF_NO_PI
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		syscall.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, errno)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// parseRate reads tc's notation: 250mbit, 1gbit, 800kbit, or bits per second.
func parseRate(s string) (float64, error) {
	units := map[string]float64{"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1}
	lower := strings.ToLower(s)
	for _, suffix := range []string{"gbit", "mbit", "kbit", "bit"} {
		if strings.HasSuffix(lower, suffix) {
			v, err := strconv.ParseFloat(strings.TrimSuffix(lower, suffix), 64)
			return v * units[suffix], err
		}
	}
	return strconv.ParseFloat(lower, 64)
}

// parseShape reads the shaping flags from args (the command line's, or a -shape file's).
func parseShape(name string, args []string) (shape, *flag.FlagSet, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	rate := fs.String("rate", "0", "bottleneck rate each way (tc notation: 250mbit; 0: unlimited)")
	delay := fs.Duration("delay", 0, "one-way delay (half the round trip)")
	queueTime := fs.Duration("queue", 50*time.Millisecond, "the bottleneck's queue, in sending time (tbf's latency)")
	loss := fs.Float64("loss", 0, "percent of frames lost, each way")
	reorder := fs.Float64("reorder", 0, "percent of frames that skip the delay, each way (netem's reorder)")
	fs.String("a", "", "one TAP device")
	fs.String("b", "", "the other TAP device")
	fs.Uint64("seed", 1, "random seed for loss and reordering")
	fs.String("shape", "", "a file of these flags, read again on SIGHUP")
	if err := fs.Parse(args); err != nil {
		return shape{}, fs, err
	}
	bps, err := parseRate(*rate)
	if err != nil || bps < 0 || *delay < 0 || *queueTime <= 0 || *loss < 0 || *loss > 100 || *reorder < 0 || *reorder > 100 {
		return shape{}, fs, fmt.Errorf("bad shape: -rate=%s -delay=%s -queue=%s -loss=%g -reorder=%g", *rate, *delay, *queueTime, *loss, *reorder)
	}
	return shape{bitsPerSecond: bps, delay: *delay, queue: *queueTime, lossPercent: *loss, reorderPct: *reorder}, fs, nil
}

func main() {
	s, fs, err := parseShape("wanlink", os.Args[1:])
	a, b := fs.Lookup("a").Value.String(), fs.Lookup("b").Value.String()
	shapeFile := fs.Lookup("shape").Value.String()
	seed, _ := strconv.ParseUint(fs.Lookup("seed").Value.String(), 10, 64)
	if err != nil || a == "" || b == "" {
		fmt.Fprintln(os.Stderr, "wanlink:", err)
		fmt.Fprintln(os.Stderr, "usage: wanlink -a TAP -b TAP [-rate 250mbit] [-delay 20ms] [-queue 50ms] [-loss PCT] [-reorder PCT] [-seed N] [-shape FILE]")
		os.Exit(2)
	}
	if shapeFile != "" {
		if s, err = shapeFrom(shapeFile); err != nil {
			fmt.Fprintln(os.Stderr, "wanlink:", err)
			os.Exit(2)
		}
	}
	tapA, err := openTap(a)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanlink:", err)
		os.Exit(1)
	}
	tapB, err := openTap(b)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanlink:", err)
		os.Exit(1)
	}
	dirs := []*direction{
		{name: a + "->" + b, in: tapA, out: tapB, shape: s, rng: rand.New(rand.NewPCG(seed, 1)), wake: make(chan struct{}, 1)},
		{name: b + "->" + a, in: tapB, out: tapA, shape: s, rng: rand.New(rand.NewPCG(seed, 2)), wake: make(chan struct{}, 1)},
	}
	for _, d := range dirs {
		go d.read()
		go d.write()
	}
	fmt.Println("ready")
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	for sig := range signals {
		if sig != syscall.SIGHUP {
			break
		}
		next, err := shapeFrom(shapeFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "wanlink: SIGHUP: shape unchanged:", err)
			continue
		}
		for _, d := range dirs {
			d.reshape(next)
		}
		fmt.Fprintf(os.Stderr, "wanlink: reshaped: %+v\n", next)
	}
	for _, d := range dirs {
		line, _ := json.Marshal(d.counters())
		fmt.Println(string(line))
	}
}

// shapeFrom reads the shaping flags from a -shape file.
func shapeFrom(path string) (shape, error) {
	if path == "" {
		return shape{}, fmt.Errorf("no -shape file to read")
	}
	text, err := os.ReadFile(path)
	if err != nil {
		return shape{}, err
	}
	s, _, err := parseShape(path, strings.Fields(string(text)))
	return s, err
}
