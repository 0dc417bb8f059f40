package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/freeport"
	"github.com/skybridge-mesh/skybridge/internal/syncbuf"
)

// The operator's paths of `skybridge migrate` and `skybridge graph`
// through the real binary, on netstack gateways on loopback (no root, no
// TUN: what they check does not depend on the device): a migration
// cancelled in flight and resumed, --bwlimit holding a transfer to its
// rate, the mesh drawn as DOT and SVG, and a receiver whose policy refuses
// at the commit what the sender's let go.

// cliSite is one gateway of a netstack mesh.
type cliSite struct {
	short, site, region, provider, jur, overlay, classes string

	dir, cfg, socket string
	cmd              *exec.Cmd
}

// cliSites are the bank's three sites; the first n of them make a mesh.
func cliSites(n int) []*cliSite {
	return []*cliSite{
		{short: "zrh", site: "onprem-zrh", region: "zrh-dc1", provider: "onprem", jur: "CH", overlay: "100.96.7.1", classes: "pii-eu,risk-batch"},
		{short: "fra", site: "aws-eu-central-1", region: "eu-central-1", provider: "aws", jur: "DE", overlay: "100.96.7.2", classes: "pii-eu,risk-batch"},
		{short: "iad", site: "aws-us-east-1", region: "us-east-1", provider: "aws", jur: "US", overlay: "100.96.7.3", classes: "risk-batch"},
	}[:n]
}

// cliMesh is a CA, a signed policy and a netstack gateway per site,
// running until the test ends.
type cliMesh struct {
	dir, ca, policy string
	sites           []*cliSite
}

// startCLIMesh starts n gateways under policyV1 and waits until each
// has the others as WireGuard peers.
func startCLIMesh(t *testing.T, n int) *cliMesh {
	t.Helper()
	m := &cliMesh{dir: t.TempDir(), sites: cliSites(n)}
	m.ca = filepath.Join(m.dir, "ca")
	sb(t, 0, "ca", "init", "--dir", m.ca)
	m.policy = m.signPolicy(t, "residency.hcl", policyV1)
	// Ports freeport finds free in its own band: the unit tests of other
	// packages probe ports from 20000 up at the same time.
	ports, err := freeport.Loopback(2 * n)
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the first start: a set-up failing half-way does
	// not leave the gateways it started running.
	t.Cleanup(func() {
		// Stopped, not killed: a gateway that does not stop on SIGTERM
		// fails the test, naming itself. One after the other: a gateway
		// whose peers all stop with it waits seconds for its leave
		// notice to go out, which one stopped alone sends at once.
		for _, s := range m.sites {
			if s.cmd == nil || s.cmd.Process == nil {
				continue // not started: the set-up failed before it
			}
			s.cmd.Process.Signal(syscall.SIGTERM)
			exited := make(chan struct{})
			go func() { s.cmd.Wait(); close(exited) }()
			select {
			case <-exited:
			case <-time.After(20 * time.Second):
				s.cmd.Process.Kill()
				<-exited
				t.Errorf("gw-%s did not stop within 20 s of SIGTERM: killed", s.short)
			}
		}
		logTails(t, filepath.Join(m.dir, "*.log"))
		noSecretsInLogs(t, m.dir, nil)
	})
	for i, s := range m.sites {
		s.dir = filepath.Join(m.dir, s.short)
		s.cfg = filepath.Join(m.dir, s.short+".hcl")
		s.socket = filepath.Join(s.dir, "control.sock")
		sb(t, 0, "ca", "issue", "--ca", m.ca, "--node", "gw-"+s.short, "--site", s.site, "--region", s.region, "--provider", s.provider,
			"--jurisdiction", s.jur, "--overlay-ip", s.overlay, "--label", "classes="+s.classes, "--out", filepath.Join(s.dir, "identity"))
		cfg := fmt.Sprintf(`state_dir = %q
node {
  name         = "gw-%s"
  site         = %q
  region       = %q
  provider     = %q
  jurisdiction = %q
  overlay_ip   = %q
  labels       = { classes = %q }
}
identity {
  dir = %q
}
enroll { listen = "off" }
gossip {
  bind    = "127.0.0.1:%d"
  seeds   = ["127.0.0.1:%d"]
  profile = "local"
}
wireguard {
  interface  = "sb%s"
  port       = %d
  mode       = "netstack"
  behind_nat = true
}
policy {
  file = %q
}
operator { listen = "127.0.0.1:0" }
`, s.dir, s.short, s.site, s.region, s.provider, s.jur, s.overlay, s.classes, filepath.Join(s.dir, "identity"), ports[i], ports[0], s.short, ports[n+i], m.policy)
		if err := os.WriteFile(s.cfg, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		logf, err := os.Create(filepath.Join(m.dir, "gw-"+s.short+".log"))
		if err != nil {
			t.Fatal(err)
		}
		s.cmd = childCommand(skybridge, "--log-level", "debug", "gateway", "run", "--config", s.cfg)
		s.cmd.Stdout, s.cmd.Stderr = logf, logf
		if err := s.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		logf.Close()
	}
	for _, s := range m.sites {
		waitFor(t, 60*time.Second, "gw-"+s.short+" has every other gateway as a peer", func() (bool, string) {
			st, err := status(s.socket)
			if err != nil {
				return false, err.Error()
			}
			return len(st.peers()) == n-1, fmt.Sprint(st.peers())
		})
	}
	return m
}

// signPolicy writes src as name in the mesh's directory, signed by its CA.
func (m *cliMesh) signPolicy(t *testing.T, name, src string) string {
	t.Helper()
	p := filepath.Join(m.dir, name)
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	sb(t, 0, "policy", "sign", "--policy", p, "--ca", m.ca)
	return p
}

// sparseImage writes a raw image of size bytes holding blocks random
// blocks of 1 MiB, spread evenly: random, so that compression does not
// shrink what crosses the wire below what the test counts on.
func sparseImage(t *testing.T, path string, size int64, blocks int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	stride := size / int64(blocks)
	for i := range int64(blocks) {
		rand.Read(buf)
		if _, err := f.WriteAt(buf, i*stride); err != nil {
			t.Fatal(err)
		}
	}
}

// timedEvent is a line of `migrate run --json`, with when it came.
type timedEvent struct {
	migrationEvent
	at time.Time
}

// cliRun is a `skybridge migrate ...` under way.
type cliRun struct {
	cmd    *exec.Cmd
	events chan timedEvent
	stdout syncbuf.Buffer // with --json, the lines that are not events
	stderr syncbuf.Buffer
	exited chan struct{}
	code   int
}

// startCLI runs skybridge with args; with --json among them its events
// come on events as they are printed.
func startCLI(t *testing.T, args ...string) *cliRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	t.Cleanup(cancel)
	r := &cliRun{events: make(chan timedEvent, 4096), exited: make(chan struct{})}
	r.cmd = exec.CommandContext(ctx, skybridge, args...)
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	r.cmd.Stderr = &r.stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev timedEvent
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.ID != "" {
				ev.at = time.Now()
				r.events <- ev
				continue
			}
			r.stdout.Write([]byte(sc.Text() + "\n"))
		}
		close(r.events)
		err := r.cmd.Wait()
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		} else if err != nil {
			r.code = -1
		}
		close(r.exited)
	}()
	return r
}

// wait waits up to timeout for the command to end and returns its last
// event, failing the test if it does not end.
func (r *cliRun) wait(t *testing.T, timeout time.Duration) timedEvent {
	t.Helper()
	var last timedEvent
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-r.events:
			if ok {
				last = ev
				continue
			}
			select {
			case <-r.exited:
				return last
			case <-deadline:
			}
		case <-deadline:
		}
		r.cmd.Process.Kill()
		t.Fatalf("skybridge %s did not end within %s\nstderr:\n%s", strings.Join(r.cmd.Args[1:], " "), timeout, r.stderr.String())
	}
}

// listing is what `migrate list --json` says.
type listing struct {
	Receiving []struct {
		ID          string `json:"id"`
		Durable     int    `json:"durable_chunks"` // of a receive under way
		Received    int64  `json:"received_bytes"`
		Interrupted bool   `json:"interrupted"`
	} `json:"receiving"`
	Images []struct {
		Name string `json:"name"`
		Path string `json:"path"`
	} `json:"images"`
}

func listMigrations(t *testing.T, socket string) listing {
	t.Helper()
	out, _ := sb(t, 0, "migrate", "list", "--json", "--socket", socket)
	var l listing
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("migrate list --json: %v\n%s", err, out)
	}
	return l
}

// auditRecords are the records of migration id in a gateway's audit log.
func auditRecords(t *testing.T, dir, id string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "audit.log"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var recs []map[string]any
	for line := range strings.Lines(string(b)) {
		var r struct {
			Fields map[string]any `json:"fields"`
		}
		if json.Unmarshal([]byte(line), &r) == nil && r.Fields["migration_id"] == id {
			recs = append(recs, r.Fields)
		}
	}
	return recs
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

// TestCLIMigrateGraph draws a running three-site mesh with `skybridge
// graph`: the DOT parses as Graphviz's grammar has it and the SVG as XML,
// and both name every site and gateway and the three tunnels, this
// gateway's own with their handshakes.
func TestCLIMigrateGraph(t *testing.T) {
	m := startCLIMesh(t, 3)
	zrh := m.sites[0]
	// The tunnels from gw-zrh are drawn by their handshake's age: waited
	// for, so that the picture is of live tunnels, not idle ones.
	waitFor(t, 30*time.Second, "gw-zrh handshakes with gw-fra and gw-iad", func() (bool, string) {
		st, err := statusAs(zrh.socket, false)
		if err != nil {
			return false, err.Error()
		}
		var hs []string
		for _, mb := range st.Members {
			if mb.Peer && mb.Handshake != "" && !strings.HasPrefix(mb.Handshake, "0001") {
				hs = append(hs, mb.Node)
			}
		}
		return len(hs) == 2, fmt.Sprint(hs)
	})

	out, _ := sb(t, 0, "graph", "--socket", zrh.socket, "--format", "dot")
	g, err := parseDOT(out)
	if err != nil {
		t.Fatalf("graph --format dot is not a DOT graph: %v\n%s", err, out)
	}
	for _, s := range m.sites {
		node := "gw-" + s.short
		attrs, ok := g.nodes[node]
		if !ok {
			t.Errorf("DOT: no node %s\n%s", node, out)
			continue
		}
		if !strings.HasPrefix(attrs["label"], node) || !strings.Contains(attrs["label"], s.overlay) {
			t.Errorf("DOT: %s is labelled %q; want its name and overlay address %s", node, attrs["label"], s.overlay)
		}
		want := fmt.Sprintf("%s (%s, %s %s)", s.site, s.jur, s.provider, s.region)
		if !slices.Contains(g.clusters, want) {
			t.Errorf("DOT: no cluster labelled %q (clusters %q)", want, g.clusters)
		}
	}
	if g.nodes["gw-zrh"]["penwidth"] == "" {
		t.Errorf("DOT: the gateway asked (gw-zrh) is not marked: %v", g.nodes["gw-zrh"])
	}
	var edges []string
	for _, e := range g.edges {
		edges = append(edges, e.a+" -- "+e.b)
		// Its own tunnels, which it handshook on, carry the age.
		if e.a == "gw-zrh" || e.b == "gw-zrh" {
			if !strings.Contains(e.attrs["label"], "handshake") || strings.Contains(e.attrs["label"], "no handshake") {
				t.Errorf("DOT: gw-zrh's tunnel %s -- %s is labelled %q; want its handshake's age", e.a, e.b, e.attrs["label"])
			}
		}
	}
	slices.Sort(edges)
	if want := []string{"gw-fra -- gw-iad", "gw-fra -- gw-zrh", "gw-iad -- gw-zrh"}; !slices.Equal(edges, want) {
		t.Errorf("DOT: tunnels %q, want the full mesh %q\n%s", edges, want, out)
	}

	out, _ = sb(t, 0, "graph", "--socket", zrh.socket, "--format", "svg")
	checkSVG(t, m, "graph --format svg", out)
	// --out FILE.svg without --format draws SVG too, as the usage says.
	file := filepath.Join(t.TempDir(), "mesh.svg")
	sb(t, 0, "graph", "--socket", zrh.socket, "--out", file)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	checkSVG(t, m, "graph --out mesh.svg", string(b))
}

// checkSVG parses doc as XML and checks that it is one SVG document
// drawing every site and gateway of m and the full mesh of tunnels, with
// gw-zrh's own fresh.
func checkSVG(t *testing.T, m *cliMesh, what, doc string) {
	t.Helper()
	d := xml.NewDecoder(strings.NewReader(doc))
	d.Strict = true
	var (
		depth, roots int
		sites, gws   []string
		tunnels      []string
		text         strings.Builder
	)
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s: not well-formed XML: %v\n%s", what, err, doc)
		}
		switch el := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				roots++
				if el.Name.Local != "svg" || el.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("%s: the root element is %s in %q, want svg in the SVG namespace", what, el.Name.Local, el.Name.Space)
				}
			}
			depth++
			a := map[string]string{}
			for _, at := range el.Attr {
				a[at.Name.Local] = at.Value
			}
			switch {
			case el.Name.Local == "g" && a["class"] == "site":
				sites = append(sites, a["data-site"])
			case el.Name.Local == "g" && a["class"] == "gateway":
				gws = append(gws, a["data-node"])
			case el.Name.Local == "line" && a["class"] == "tunnel":
				pair := []string{a["data-a"], a["data-b"]}
				slices.Sort(pair)
				tunnels = append(tunnels, pair[0]+" -- "+pair[1])
				if slices.Contains(pair, "gw-zrh") && a["data-health"] != "fresh" {
					t.Errorf("%s: gw-zrh's tunnel %v is drawn %q, want fresh (it just handshook)", what, pair, a["data-health"])
				}
			}
		case xml.EndElement:
			depth--
		case xml.CharData:
			text.Write(el)
		}
	}
	if roots != 1 {
		t.Fatalf("%s: %d root elements, want one svg", what, roots)
	}
	var wantSites, wantGws []string
	for _, s := range m.sites {
		wantSites, wantGws = append(wantSites, s.site), append(wantGws, "gw-"+s.short)
		// What a reader of the picture sees, not only the attributes.
		for _, name := range []string{s.site, "gw-" + s.short, s.overlay} {
			if !strings.Contains(text.String(), name) {
				t.Errorf("%s: no text says %s", what, name)
			}
		}
	}
	slices.Sort(sites)
	slices.Sort(wantSites)
	slices.Sort(gws)
	slices.Sort(wantGws)
	slices.Sort(tunnels)
	if !slices.Equal(sites, wantSites) || !slices.Equal(gws, wantGws) {
		t.Errorf("%s: sites %q and gateways %q drawn, want %q and %q", what, sites, gws, wantSites, wantGws)
	}
	if want := []string{"gw-fra -- gw-iad", "gw-fra -- gw-zrh", "gw-iad -- gw-zrh"}; !slices.Equal(tunnels, want) {
		t.Errorf("%s: tunnels %q drawn, want the full mesh %q", what, tunnels, want)
	}
}

// dotGraph is what a DOT document declares.
type dotGraph struct {
	nodes    map[string]map[string]string // by ID, with their attributes
	edges    []dotEdge
	clusters []string // the subgraphs' labels
}

type dotEdge struct {
	a, b  string
	attrs map[string]string
}

// parseDOT reads an undirected graph as Graphviz's grammar has it (graph,
// subgraph, node, edge and attribute statements) and refuses anything
// else: a brace or bracket left open, a string not closed, a directed
// edge, an edge to a node the graph does not declare. Graphviz itself is
// not among the tools the tests install; this is the part of its grammar
// that `skybridge graph` is to write.
func parseDOT(src string) (*dotGraph, error) {
	toks, err := dotTokens(src)
	if err != nil {
		return nil, err
	}
	p := &dotParser{toks: toks, g: &dotGraph{nodes: map[string]map[string]string{}}}
	if err := p.graph(); err != nil {
		return nil, fmt.Errorf("at token %d (%q): %w", p.i, p.peek().text, err)
	}
	for _, e := range p.g.edges {
		for _, n := range []string{e.a, e.b} {
			if _, ok := p.g.nodes[n]; !ok {
				return nil, fmt.Errorf("edge %s -- %s: node %s is not declared", e.a, e.b, n)
			}
		}
	}
	return p.g, nil
}

type dotToken struct {
	text   string
	quoted bool // an ID in double quotes: never a keyword or punctuation
}

func dotTokens(src string) ([]dotToken, error) {
	var toks []dotToken
	for i := 0; i < len(src); {
		c := src[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case strings.IndexByte("{}[];,=", c) >= 0:
			toks = append(toks, dotToken{text: string(c)})
			i++
		case strings.HasPrefix(src[i:], "--"):
			toks = append(toks, dotToken{text: "--"})
			i += 2
		case strings.HasPrefix(src[i:], "->"):
			return nil, fmt.Errorf("offset %d: a directed edge in an undirected graph", i)
		case c == '"':
			// Only \" is an escape in a DOT string; \n and the like are
			// kept for the renderer.
			var b strings.Builder
			j := i + 1
			for ; j < len(src) && src[j] != '"'; j++ {
				if src[j] == '\\' && j+1 < len(src) && src[j+1] == '"' {
					j++
				}
				b.WriteByte(src[j])
			}
			if j == len(src) {
				return nil, fmt.Errorf("offset %d: a string that is not closed", i)
			}
			toks = append(toks, dotToken{text: b.String(), quoted: true})
			i = j + 1
		case c == '_' || c == '.' || c == '-' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80:
			j := i
			for j < len(src) && (src[j] == '_' || src[j] == '.' || src[j] >= '0' && src[j] <= '9' || src[j] >= 'a' && src[j] <= 'z' || src[j] >= 'A' && src[j] <= 'Z' || src[j] >= 0x80) {
				j++
			}
			if j == i { // a lone '-' that starts no edge
				return nil, fmt.Errorf("offset %d: unexpected %q", i, c)
			}
			toks = append(toks, dotToken{text: src[i:j]})
			i = j
		default:
			return nil, fmt.Errorf("offset %d: unexpected %q", i, c)
		}
	}
	return toks, nil
}

type dotParser struct {
	toks []dotToken
	i    int
	g    *dotGraph
}

func (p *dotParser) peek() dotToken {
	if p.i < len(p.toks) {
		return p.toks[p.i]
	}
	return dotToken{text: "end of input"}
}

// is reports whether the next token is the keyword or punctuation s.
func (p *dotParser) is(s string) bool {
	t := p.peek()
	return p.i < len(p.toks) && !t.quoted && t.text == s
}

func (p *dotParser) expect(s string) error {
	if !p.is(s) {
		return fmt.Errorf("want %q", s)
	}
	p.i++
	return nil
}

func (p *dotParser) id() (string, error) {
	t := p.peek()
	if p.i >= len(p.toks) || !t.quoted && (strings.ContainsAny(t.text, "{}[];,=") || t.text == "--") {
		return "", errors.New("want an ID")
	}
	p.i++
	return t.text, nil
}

func (p *dotParser) graph() error {
	if err := p.expect("graph"); err != nil {
		return err
	}
	if !p.is("{") {
		if _, err := p.id(); err != nil {
			return err
		}
	}
	if err := p.expect("{"); err != nil {
		return err
	}
	if _, err := p.stmts(); err != nil {
		return err
	}
	if p.i != len(p.toks) {
		return errors.New("more after the graph's closing brace")
	}
	return nil
}

// stmts reads statements up to and with the closing brace, and returns
// the attributes they set on the (sub)graph.
func (p *dotParser) stmts() (map[string]string, error) {
	attrs := map[string]string{}
	for !p.is("}") {
		if p.i >= len(p.toks) {
			return nil, errors.New("a brace is not closed")
		}
		switch {
		case p.is("subgraph"):
			p.i++
			if !p.is("{") {
				if _, err := p.id(); err != nil {
					return nil, err
				}
			}
			if err := p.expect("{"); err != nil {
				return nil, err
			}
			sub, err := p.stmts()
			if err != nil {
				return nil, err
			}
			p.g.clusters = append(p.g.clusters, sub["label"])
		case p.is("graph") || p.is("node") || p.is("edge"):
			p.i++
			if _, err := p.attrList(); err != nil {
				return nil, err
			}
		default:
			a, err := p.id()
			if err != nil {
				return nil, err
			}
			switch {
			case p.is("="):
				p.i++
				v, err := p.id()
				if err != nil {
					return nil, err
				}
				attrs[a] = v
			case p.is("--"):
				ends := []string{a}
				for p.is("--") {
					p.i++
					b, err := p.id()
					if err != nil {
						return nil, err
					}
					ends = append(ends, b)
				}
				al, err := p.attrList()
				if err != nil {
					return nil, err
				}
				for k := 1; k < len(ends); k++ {
					p.g.edges = append(p.g.edges, dotEdge{a: ends[k-1], b: ends[k], attrs: al})
				}
			default:
				al, err := p.attrList()
				if err != nil {
					return nil, err
				}
				if _, dup := p.g.nodes[a]; dup {
					return nil, fmt.Errorf("node %s declared twice", a)
				}
				p.g.nodes[a] = al
			}
		}
		if p.is(";") {
			p.i++
		}
	}
	p.i++ // the closing brace
	return attrs, nil
}

// attrList reads zero or more [k=v, ...] lists.
func (p *dotParser) attrList() (map[string]string, error) {
	attrs := map[string]string{}
	for p.is("[") {
		p.i++
		for !p.is("]") {
			if p.i >= len(p.toks) {
				return nil, errors.New("a bracket is not closed")
			}
			k, err := p.id()
			if err != nil {
				return nil, err
			}
			if err := p.expect("="); err != nil {
				return nil, err
			}
			v, err := p.id()
			if err != nil {
				return nil, err
			}
			attrs[k] = v
			if p.is(",") || p.is(";") {
				p.i++
			}
		}
		p.i++
	}
	return attrs, nil
}

// TestCLIMigrateBWLimit migrates 16 MiB of random data (which does not
// compress) at --bwlimit 4MB/s: the transfer takes the seconds the cap
// says, not a burst, whatever the number of streams. The rate is
// measured here, from the events' arrival, not taken from the gateway's
// own account of it.
func TestCLIMigrateBWLimit(t *testing.T) {
	m := startCLIMesh(t, 2)
	zrh := m.sites[0]
	img := filepath.Join(m.dir, "vm.raw")
	const data = 16 << 20
	sparseImage(t, img, 64<<20, data>>20)
	const limit = 4e6 // 4MB/s: bytes, not bits, and 10^6
	run := startCLI(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--bwlimit", "4MB/s", "--json", "--socket", zrh.socket)
	var began time.Time // of the transfer: scanning the image is not sending it
	for ev := range run.events {
		if p := ev.Progress; p != nil && p.Phase == "transfer" {
			began = ev.at
			break
		}
	}
	last := run.wait(t, time.Minute)
	if run.code != 0 || last.Record == nil || last.Record.State != "done" {
		t.Fatalf("migrate run --bwlimit 4MB/s: exit %d, last event %+v\n%s", run.code, last, run.stderr.String())
	}
	if began.IsZero() {
		t.Fatal("no progress event of the transfer phase")
	}
	// From the first transfer event to the end there is also the dial,
	// the offer and the commit: the rate measured is at most the true one.
	st := last.Record.Stats
	secs := last.at.Sub(began).Seconds()
	rate := float64(st.BytesSent) / secs
	t.Logf("%d bytes on the wire (%d read) in %.2f s: %.2f MB/s under a cap of %.0f MB/s", st.BytesSent, st.BytesRead, secs, rate/1e6, limit/1e6)
	if st.BytesSent < data {
		t.Fatalf("%d bytes sent for %d of random data: the test's measure assumes it crosses whole", st.BytesSent, data)
	}
	if rate > 1.5*limit {
		t.Errorf("--bwlimit 4MB/s moved %.2f MB/s (%d bytes in %.2f s): over 1.5 times the cap", rate/1e6, st.BytesSent, secs)
	}
	// A cap read as bits, or a limiter that stalls, is far below it.
	if rate < limit/3 {
		t.Errorf("--bwlimit 4MB/s moved %.2f MB/s (%d bytes in %.2f s): under a third of the cap", rate/1e6, st.BytesSent, secs)
	}
	stored := listMigrations(t, m.sites[1].socket).Images
	if len(stored) != 1 {
		t.Fatalf("gw-fra stores %+v, want the one image", stored)
	}
	sameFile(t, img, stored[0].Path)
}

// TestCLIMigrateCancelResume cancels a migration in flight with `migrate
// cancel`, as an operator does from another terminal: the send stops at
// once (the run's client says it was cancelled and how to resume, the
// journal and the audit log say cancelled, the receiver takes nothing
// more and keeps what is durable as an interrupted receive), and `migrate
// resume` finishes it without sending again what had arrived.
func TestCLIMigrateCancelResume(t *testing.T) {
	m := startCLIMesh(t, 2)
	zrh, fra := m.sites[0], m.sites[1]
	img := filepath.Join(m.dir, "vm.raw")
	const chunks = 8 // of random data, 1 MiB each: a chunk each
	sparseImage(t, img, 64<<20, chunks)
	// Capped, so that it is still sending when it is cancelled: the 8 MiB
	// take 8 s, and on two streams the first two chunks are done after
	// two, leaving six to cancel in on a busy machine.
	run := startCLI(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--streams", "2", "--bwlimit", "1MB/s", "--json", "--socket", zrh.socket)
	id := ""
	for ev := range run.events {
		id = ev.ID
		if p := ev.Progress; p != nil && p.Stats.ChunksDone >= 2 {
			break
		}
	}
	if id == "" {
		t.Fatalf("no migration ID\n%s", run.stderr.String())
	}
	asked := time.Now()
	out, _ := sb(t, 0, "migrate", "cancel", id, "--socket", zrh.socket)
	if want := fmt.Sprintf("migration %s cancelled; `skybridge migrate resume %s` continues it", id, id); !strings.Contains(out, want) {
		t.Fatalf("migrate cancel said:\n%s\nwant %q", out, want)
	}
	// The send stops promptly: the run's client ends within seconds, not
	// when the capped transfer would have.
	last := run.wait(t, 10*time.Second)
	stopped := time.Since(asked)
	if run.code != 1 || last.Record == nil || last.Record.State != "cancelled" {
		t.Fatalf("migrate run, cancelled: exit %d, last event %+v\n%s", run.code, last, run.stderr.String())
	}
	if want := fmt.Sprintf("migration %s cancelled: skybridge migrate resume %s carries on where it stopped", id, id); !strings.Contains(run.stderr.String(), want) {
		t.Errorf("migrate run, cancelled, said:\n%s\nwant %q", run.stderr.String(), want)
	}
	if stopped > 5*time.Second { // a process started, fsyncs: not the 6 s left at the cap
		t.Errorf("migrate run ended %s after migrate cancel: not promptly", stopped)
	}
	sent := last.Record.Stats
	if sent.ChunksDone >= chunks {
		t.Fatalf("every chunk was done before the cancel: %+v", sent)
	}

	// The journal says cancelled.
	out, _ = sb(t, 0, "migrate", "status", id, "--json", "--socket", zrh.socket)
	var st struct {
		Record *struct {
			State string `json:"state"`
		} `json:"record"`
		Progress *json.RawMessage `json:"progress"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Record == nil || st.Record.State != "cancelled" || st.Progress != nil {
		t.Fatalf("migrate status %s after the cancel: %v\n%s", id, err, out)
	}
	// So does the sender's audit log, whose chain holds.
	recs := auditRecords(t, zrh.dir, id)
	if len(recs) != 1 || recs[0]["outcome"] != "cancelled" {
		t.Fatalf("gw-zrh's audit records of %s: %v; want one, cancelled", id, recs)
	}
	sb(t, 0, "audit", "verify", "--log", filepath.Join(zrh.dir, "audit.log"), "--ca-cert", filepath.Join(m.ca, "ca.crt"))

	// The receiver keeps what is durable, as an interrupted receive (what
	// its file holds on disk: an interrupted one counts no chunks), and
	// stores nothing.
	var held int64
	waitFor(t, 15*time.Second, "gw-fra holds the cancelled migration as interrupted", func() (bool, string) {
		l := listMigrations(t, fra.socket)
		for _, r := range l.Receiving {
			if r.ID == id {
				held = r.Received
				return r.Interrupted && len(l.Images) == 0, fmt.Sprintf("%+v", l)
			}
		}
		return false, fmt.Sprintf("%+v", l)
	})
	if held < int64(sent.ChunksDone)<<20 || held >= chunks<<20 {
		t.Fatalf("gw-fra holds %d bytes of the cancelled migration; want the %d chunks acknowledged before the cancel, not all %d", held, sent.ChunksDone, chunks)
	}
	// Nothing more arrives once it is cancelled: watched for longer than
	// a chunk takes at the cap.
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if l := listMigrations(t, fra.socket); len(l.Receiving) != 1 || l.Receiving[0].Received != held {
			t.Fatalf("gw-fra's receive of the cancelled migration changed: %+v, held %d bytes", l.Receiving, held)
		}
	}

	// The resume sends only what had not arrived.
	res := startCLI(t, "migrate", "resume", id, "--json", "--socket", zrh.socket)
	last = res.wait(t, time.Minute)
	if res.code != 0 || last.Record == nil || last.Record.State != "done" {
		t.Fatalf("migrate resume %s: exit %d, last event %+v\n%s", id, res.code, last, res.stderr.String())
	}
	done := last.Record.Stats
	t.Logf("cancelled after %d of %d chunks (%d bytes held at gw-fra), in %s; the resume skipped %d unread, found %d there, sent %d",
		sent.ChunksDone, chunks, held, stopped.Round(time.Millisecond), done.ChunksResumed, done.ChunksHad, done.ChunksSent)
	if done.ChunksResumed+done.ChunksHad < sent.ChunksDone || done.ChunksSent > chunks-sent.ChunksDone {
		t.Errorf("the resume sent %d chunks again, %d resumed and %d found at gw-fra: the %d done before the cancel should not go again", done.ChunksSent, done.ChunksResumed, done.ChunksHad, sent.ChunksDone)
	}
	l := listMigrations(t, fra.socket)
	if len(l.Images) != 1 || len(l.Receiving) != 0 {
		t.Fatalf("gw-fra after the resume: %+v", l)
	}
	sameFile(t, img, l.Images[0].Path)
	recs = auditRecords(t, zrh.dir, id)
	if len(recs) != 2 || recs[1]["outcome"] != "done" {
		t.Errorf("gw-zrh's audit records of %s after the resume: %v; want cancelled, then done", id, recs)
	}
	sb(t, 0, "audit", "verify", "--log", filepath.Join(fra.dir, "audit.log"), "--ca-cert", filepath.Join(m.ca, "ca.crt"))
}

// TestCLIMigrateReceiverRefusal: the receiving gateway decides with its
// own policy, not the sender's word. A migration the sender's policy
// allows (EU personal data to Frankfurt, version 1) is under way when
// Frankfurt's gateway adopts version 2, which forbids storing it there:
// at the commit the receiver refuses, removes what came and records the
// denial, and the sender's `migrate run` exits 1 saying the receiver
// refused and why.
func TestCLIMigrateReceiverRefusal(t *testing.T) {
	m := startCLIMesh(t, 2)
	zrh, fra := m.sites[0], m.sites[1]
	const reason = "e2e: no EU personal data at rest in Germany from version 2 on"
	v2 := strings.Replace(strings.Replace(policyV1, "version = 1", "version = 2", 1), `class "pii-eu" {`, `class "pii-eu" {
  deny "store" {
    jurisdiction = ["DE"]
    reason       = "`+reason+`"
  }`, 1)
	pol2 := m.signPolicy(t, "residency-v2.hcl", v2)
	img := filepath.Join(m.dir, "vm.raw")
	const chunks = 8
	sparseImage(t, img, 64<<20, chunks)
	// One stream at 1MB/s: its first chunk is durable at Frankfurt a
	// second in, the last about eight seconds in, and the new policy
	// comes between the two with seconds to spare.
	run := startCLI(t, "migrate", "run", img, "--to", "aws-eu-central-1", "--class", "pii-eu", "--streams", "1", "--bwlimit", "1MB/s", "--socket", zrh.socket)
	id := ""
	waitFor(t, 30*time.Second, "gw-fra holds a chunk of the migration durable", func() (bool, string) {
		l := listMigrations(t, fra.socket)
		if len(l.Receiving) == 1 && l.Receiving[0].Durable > 0 {
			id = l.Receiving[0].ID
			return true, ""
		}
		return false, fmt.Sprintf("%+v", l.Receiving)
	})
	// The sender judged the migration under version 1 when it began; only
	// the receiver has version 2 in force before the commit (gossip takes
	// it to the sender too, which does not judge a running send again).
	out, _ := sb(t, 0, "policy", "publish", "--policy", pol2, "--socket", fra.socket)
	if !strings.Contains(out, "gateway adopted e2e v2") {
		t.Fatalf("policy publish to gw-fra said:\n%s", out)
	}
	// Still receiving, nothing stored: the commit, to come, is judged
	// under version 2.
	if l := listMigrations(t, fra.socket); len(l.Images) != 0 || len(l.Receiving) != 1 {
		t.Fatalf("gw-fra had stored the migration, or ended its receive, before it adopted version 2: the cap leaves too little time on this machine: %+v", l)
	}
	run.wait(t, time.Minute)
	if run.code != 1 {
		t.Fatalf("migrate run refused at the commit: exit %d, want 1\nstdout:\n%s\nstderr:\n%s", run.code, run.stdout.String(), run.stderr.String())
	}
	said := run.stdout.String()
	for _, want := range []string{"REFUSED by the residency policy at the receiver when the image was to be stored", "what was sent has been removed there"} {
		if !strings.Contains(said, want) {
			t.Errorf("migrate run refused at the commit said:\n%s\nwant %q", said, want)
		}
	}
	// The receiver's reasons, each on its own line.
	if !slices.ContainsFunc(strings.Split(said, "\n"), func(l string) bool { return strings.HasPrefix(l, "  - ") && strings.Contains(l, reason) }) {
		t.Errorf("migrate run refused at the commit said:\n%s\nwant the reason %q listed", said, reason)
	}

	// The receiver recorded the denial, under version 2, in a log that
	// verifies; what came is gone.
	recs := auditRecords(t, fra.dir, id)
	if len(recs) != 1 || recs[0]["outcome"] != "denied" || recs[0]["error"] != "denied at commit" || recs[0]["class"] != "pii-eu" ||
		!strings.HasPrefix(fmt.Sprint(recs[0]["policy"]), "v2-") {
		t.Fatalf("gw-fra's audit records of %s: %v; want one denial at the commit under version 2", id, recs)
	}
	sb(t, 0, "audit", "verify", "--log", filepath.Join(fra.dir, "audit.log"), "--ca-cert", filepath.Join(m.ca, "ca.crt"))
	if l := listMigrations(t, fra.socket); len(l.Images) != 0 || len(l.Receiving) != 0 {
		t.Fatalf("gw-fra after refusing at the commit: %+v; want nothing stored or kept", l)
	}
	if ents, err := os.ReadDir(filepath.Join(fra.dir, "images", ".incoming")); err != nil && !errors.Is(err, os.ErrNotExist) || len(ents) != 0 {
		t.Fatalf("gw-fra's incoming files after refusing at the commit: %v %v", ents, err)
	}
	// The sender's record says who refused, and when.
	recs = auditRecords(t, zrh.dir, id)
	if len(recs) != 1 || recs[0]["outcome"] != "denied" || recs[0]["denied_by"] != "receiver" || recs[0]["denied_at_commit"] != true {
		t.Fatalf("gw-zrh's audit records of %s: %v; want one denial by the receiver at the commit", id, recs)
	}
}
