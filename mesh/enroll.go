package mesh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/netutil"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/throttle"
	"github.com/skybridge-mesh/skybridge/policy"
)

// The enrolling side of burst sites: a gateway that holds the mesh CA
// (identity.ca_dir) serves POST /v1/enroll over TLS on its underlay. The
// channel is authenticated both ways: the newcomer checks our certificate
// against the CA its token pins, we check the token's secret against the
// hash we kept. What we sign is decided here, from the burst's record,
// never from what the newcomer asks.

// DefaultEnrollPort is where CA-holding gateways serve enrollment.
const DefaultEnrollPort = 7947

// enrollment is the state of a CA-holding gateway's burst sites.
type enrollment struct {
	ca    *certs.CA    // embedded CA: we enrol newcomers ourselves
	vault *certs.Vault // Vault: it admits them; we set it up and keep the record
	mu    sync.Mutex   // guards book and its file
	book  *burstBook
	// queue holds the enrollments waiting to be served (enrolQueued),
	// draining says a goroutine serves them; both under qmu.
	qmu      sync.Mutex
	queue    []*enrolJob
	draining bool
	// warnRefused says when a refusal is worth logging again: anyone who
	// can reach the endpoint can have enrollments refused.
	warnRefused throttle.PerSecond
}

// maxEnrollConns bounds the connections the enrollment endpoint serves at
// once, before any is authenticated: a burst enrols at most
// MaxBurstGateways gateways, each with one request. maxEnrollPerSource
// bounds those of one address, so that a single client holding
// connections open (each until its TLS handshake times out) cannot take
// every slot; newcomers behind one NAT address beyond it are turned away
// and try again (postEnroll), each enrollment taking milliseconds.
const (
	maxEnrollConns     = 2 * MaxBurstGateways
	maxEnrollPerSource = 16
)

// perSourceListener closes at once a connection from an address that
// already has max open, before it takes one of the endpoint's slots.
type perSourceListener struct {
	net.Listener
	max     int
	refused func(from netip.Addr)
	open    sourceCounts
	// exact holds the addresses that count alone, not by their /64: the
	// overlay's, each one gateway's, which WireGuard lets no one else
	// send from.
	exact netip.Prefix
}

func limitPerSource(ln net.Listener, max int, refused func(netip.Addr)) *perSourceListener {
	return &perSourceListener{Listener: ln, max: max, refused: refused}
}

// sourceCounts counts what each source address (sourceOf) holds open.
type sourceCounts struct {
	mu   sync.Mutex
	open map[netip.Addr]int
}

// take counts one more for from, unless it already holds max and exempt
// (if any; asked only then, so that the common case costs a map access)
// does not let it past. It reports whether it counted.
func (s *sourceCounts) take(from netip.Addr, max int, exempt func(netip.Addr) bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[from] >= max && (exempt == nil || !exempt(from)) {
		return false
	}
	if s.open == nil {
		s.open = map[netip.Addr]int{}
	}
	s.open[from]++
	return true
}

func (s *sourceCounts) release(from netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[from]--; s.open[from] <= 0 {
		delete(s.open, from)
	}
}

func (l *perSourceListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		from := sourceOf(ap.Addr())
		if a := ap.Addr().Unmap(); l.exact.IsValid() && l.exact.Contains(a) {
			from = a
		}
		if !l.open.take(from, l.max, nil) {
			c.Close()
			if l.refused != nil {
				l.refused(from)
			}
			continue
		}
		return &sourceConn{Conn: c, release: func() { l.open.release(from) }}, nil
	}
}

// sourceOf is the address a connection counts under: an IPv4 address, or
// the /64 of an IPv6 one (a single host is routed a whole /64 and may
// pick any address in it).
func sourceOf(a netip.Addr) netip.Addr {
	if a = a.Unmap(); a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// sourceConn gives its source's place back once, however often closed.
type sourceConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *sourceConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// validTokenID reports whether id can be a join token's: 16 hex digits
// (certs.NewJoinToken). Anything else is refused before it is looked up
// or logged.
func validTokenID(id string) bool {
	if len(id) != 16 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil
}

// enrollRequest is what a newcomer sends.
type enrollRequest struct {
	Token  string `json:"token"`  // the token's ID
	Secret []byte `json:"secret"` // its secret
	CSR    []byte `json:"csr"`    // PEM; proves possession of the key to certify
}

// enrollResponse is what it gets: an identity bound to the burst, the
// mesh's trust, its gossip keyring and whom to gossip with.
type enrollResponse struct {
	Certificate []byte    `json:"certificate"` // PEM
	CAs         []byte    `json:"cas"`         // PEM
	CRL         []byte    `json:"crl,omitempty"`
	Keyring     []byte    `json:"gossip_keyring"`
	Seeds       []string  `json:"seeds"`
	Expires     time.Time `json:"expires"`
}

// openEnrollment prepares burst sites: on a gateway holding the embedded
// CA whose enrollment endpoint is not off, or on any Vault-backed
// gateway.
func (g *Gateway) openEnrollment() error {
	var e *enrollment
	switch iss := g.prov.Issuer().(type) {
	case *certs.CA:
		if !g.s.EnrollListen.IsValid() {
			return nil
		}
		e = &enrollment{ca: iss}
	case *certs.Vault:
		e = &enrollment{vault: iss}
	default:
		return nil
	}
	book, err := g.state.loadBursts()
	if err != nil {
		return err
	}
	e.book = book
	g.enroll = e
	return nil
}

// serveEnrollment listens for newcomers.
func (g *Gateway) serveEnrollment(ctx context.Context) (io.Closer, error) {
	if g.enroll == nil || g.enroll.ca == nil {
		return closerFunc(func() error { return nil }), nil
	}
	ln, err := net.Listen("tcp", g.s.EnrollListen.String())
	if err != nil {
		return nil, fmt.Errorf("enrollment endpoint: %w", err)
	}
	ec := &enrollerCert{ca: g.enroll.ca, log: g.log, revoked: func(serial *big.Int) bool {
		tb := g.trust.Load()
		return tb != nil && tb.IsRevoked(serial)
	}}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// A renewal authenticates with the gateway's current
		// certificate, checked by renewPeer; a newcomer has none.
		ClientAuth: tls.RequestClientCert,
		// A certificate of this endpoint's own, which names this gateway
		// and nothing else about it, with the CA behind it, for the
		// newcomer to check against its pin.
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			a := g.id.Load().Attributes()
			return ec.get(a.Node, a.OverlayIP, g.now())
		},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/enroll", func(w http.ResponseWriter, r *http.Request) {
		// One request per newcomer: its connection does not hold one of
		// the listener's slots for more.
		w.Header().Set("Connection", "close")
		var req enrollRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			http.Error(w, "malformed enrollment request: "+err.Error(), http.StatusBadRequest)
			return
		}
		res, err := g.enrol(req, r.RemoteAddr)
		var refused *enrollRefusal
		switch {
		case errors.As(err, &refused):
			http.Error(w, refused.Error(), http.StatusForbidden)
			return
		case err != nil:
			// Our trouble, not the newcomer's: it may try again.
			g.log.Error("enrollment failed", "token", req.Token, "from", r.RemoteAddr, "err", err)
			http.Error(w, "enrollment failed on the enrolling gateway (see its log); try again", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(res)
	})
	mux.HandleFunc("POST "+certs.RenewPath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		var req certs.RenewRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			http.Error(w, "malformed renewal request: "+err.Error(), http.StatusBadRequest)
			return
		}
		cert, err := g.renewPeer(r.TLS.PeerCertificates, req.CSR, r.RemoteAddr)
		switch {
		case errors.Is(err, certs.ErrIssueRefused):
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		case err != nil:
			g.log.Error("certificate renewal failed", "from", r.RemoteAddr, "err", err)
			http.Error(w, "renewal failed on the CA-holding gateway (see its log); try again", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(certs.RenewResponse{Certificate: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 15 * time.Second, WriteTimeout: 15 * time.Second, IdleTimeout: 5 * time.Second,
		// TLS handshake failures (scanners, wrong pins) are debug noise.
		ErrorLog: log.New(slogWriter{g.log.With("component", "enroll")}, "", 0)}
	var warnCrowded throttle.PerSecond
	perSource := limitPerSource(ln, maxEnrollPerSource, func(from netip.Addr) {
		if ok, dropped := warnCrowded.Allow(); ok {
			g.log.Warn("enrollment connection turned away: its address has as many open as one may", "from", from, "open", maxEnrollPerSource, "turned_away_unlogged", dropped)
		}
	})
	go srv.Serve(tls.NewListener(netutil.LimitListener(perSource, maxEnrollConns), cfg))
	g.log.Info("enrolling burst gateways and renewing gateways issued offline", "listen", ln.Addr().String(), "advertise", g.s.EnrollAdvertise.String())
	return closerFunc(func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	}), nil
}

// renewPeer renews the certificate of a gateway issued offline, which
// proved in the TLS handshake that it holds chain[0]'s key: the mesh must
// accept that certificate now, and the CA must stand behind it
// (certs.CA.Renew).
func (g *Gateway) renewPeer(chain []*x509.Certificate, csr []byte, from string) (*x509.Certificate, error) {
	refused := func(err error) error {
		if ok, dropped := g.enroll.warnRefused.Allow(); ok {
			g.log.Warn("certificate renewal refused", "from", from, "err", err, "refused_unlogged", dropped)
		}
		g.metrics.renewal("refused")
		return err
	}
	if len(chain) == 0 {
		return nil, refused(fmt.Errorf("%w: a renewal authenticates with the gateway's current certificate (TLS client certificate), and none was presented", certs.ErrIssueRefused))
	}
	now := g.now()
	if _, err := g.trust.Load().VerifyCertificate(chain[0], now); err != nil {
		return nil, refused(fmt.Errorf("%w: %v", certs.ErrIssueRefused, err))
	}
	cert, err := g.enroll.ca.Renew(chain[0], csr, now)
	if errors.Is(err, certs.ErrIssueRefused) {
		return nil, refused(err)
	}
	if err != nil {
		return nil, err
	}
	g.metrics.renewal("renewed")
	g.log.Info("renewed the certificate of a gateway issued offline", "peer", cert.Subject.CommonName, "from", from,
		"serial", certs.FormatSerial(chain[0].SerialNumber), "new_serial", certs.FormatSerial(cert.SerialNumber), "valid_until", cert.NotAfter.UTC().Format(time.RFC3339))
	return cert, nil
}

// enrol redeems a token: it certifies the newcomer's key for the burst
// site, records the token as used (durably, before answering) and hands
// over what a gateway needs to join. The enrollments that come while
// others are being served wait, and are served together (enrolBatch).
func (g *Gateway) enrol(req enrollRequest, from string) (*enrollResponse, error) {
	e := g.enroll
	if !validTokenID(req.Token) {
		g.metrics.enrollment("refused")
		return nil, &enrollRefusal{errToken}
	}
	csr, err := parseEnrollCSR(req.CSR)
	if err != nil {
		return nil, &enrollRefusal{err}
	}
	keySum := sha256.Sum256(csr.RawSubjectPublicKeyInfo)
	j := &enrolJob{req: req, csr: csr, key: hex.EncodeToString(keySum[:]), from: from, done: make(chan struct{})}
	e.qmu.Lock()
	e.queue = append(e.queue, j)
	start := !e.draining
	e.draining = true
	e.qmu.Unlock()
	if start {
		go g.enrolQueued()
	}
	// Not given up when the newcomer hangs up: served all the same, it
	// gets what it was issued when it asks again with its key.
	<-j.done
	return j.res, j.err
}

// enrolJob is one newcomer's enrollment, waiting to be served.
type enrolJob struct {
	req  enrollRequest
	csr  *x509.CertificateRequest
	key  string // the hex SHA-256 of the key to certify
	from string
	res  *enrollResponse
	err  error
	done chan struct{}
}

func (j *enrolJob) finish(res *enrollResponse, err error) {
	j.res, j.err = res, err
	close(j.done)
}

// enrolQueued serves the enrollments queued, those that came meanwhile
// together, until none is left.
func (g *Gateway) enrolQueued() {
	e := g.enroll
	for {
		e.qmu.Lock()
		batch := e.queue
		e.queue = nil
		if len(batch) == 0 {
			e.draining = false
			e.qmu.Unlock()
			return
		}
		e.qmu.Unlock()
		e.mu.Lock()
		later := g.enrolBatch(batch)
		e.mu.Unlock()
		if len(later) > 0 {
			e.qmu.Lock()
			e.queue = append(later, e.queue...)
			e.qmu.Unlock()
		}
	}
}

// enrolling is an enrollment of a batch whose token was redeemed.
type enrolling struct {
	j      *enrolJob
	rec    *burstRecord
	t      *burstToken
	again  bool // its token used already, by the same key
	attrs  certs.Attributes
	cert   *x509.Certificate
	before burstToken // the token before this enrollment, to put back if its use cannot be recorded
	failed bool
}

func (a *enrolling) fail(err error) {
	a.failed = true
	a.j.finish(nil, err)
}

// enrolBatch serves enrollments that came together, under e.mu: their
// certificates issued by one write of the CA's index, their tokens'
// use recorded by one write of the burst record. Both files are written
// whole, with an fsync, and grow with every gateway enrolled: written for
// each gateway, 2,000 gateways' enrollments took minutes, and those
// behind one address (16 served at once) gave up. A token asked for twice
// in the batch is served once; the other asks are returned, for the next
// batch, which finds it used.
func (g *Gateway) enrolBatch(batch []*enrolJob) (later []*enrolJob) {
	e := g.enroll
	now := g.now()
	tb := g.trust.Load()
	var (
		all     []*enrolling
		issue   []*enrolling
		used    map[netip.Addr]bool // overlay addresses in use, read once the batch needs them
		index   []certs.IssuedCert  // the CA's index, likewise: one read, not one a lost answer
		redeems = map[string]bool{}
	)
	for _, j := range batch {
		if redeems[j.req.Token] {
			later = append(later, j)
			continue
		}
		redeems[j.req.Token] = true
		rec, i, again, err := e.book.redeem(j.req.Token, j.req.Secret, j.key, now)
		if err != nil {
			if ok, dropped := e.warnRefused.Allow(); ok {
				g.log.Warn("enrollment refused", "token", j.req.Token, "from", j.from, "err", err, "refused_unlogged", dropped)
			}
			g.metrics.enrollment("refused")
			j.finish(nil, &enrollRefusal{err})
			continue
		}
		a := &enrolling{j: j, rec: rec, t: &rec.Tokens[i], again: again}
		t := a.t
		var ip netip.Addr
		if again {
			// The same gateway (it holds the key) lost the answer: it gets
			// the certificate it was sent, with its name and address.
			if ip, err = netip.ParseAddr(t.OverlayIP); err != nil {
				j.finish(nil, fmt.Errorf("burst record of %s: token %s: %w", rec.Site, t.ID, err))
				continue
			}
			// An answer that was lost leaves its certificate valid. One an
			// operator revoked (a stolen key, say) must stay revoked: the
			// token and the key are no way back in.
			if index == nil {
				if index, err = e.ca.Issued(); err != nil {
					j.finish(nil, fmt.Errorf("the CA's record of certificate %s: %w", t.Serial, err))
					continue
				}
			}
			if !stillValid(index, t.Serial, now) {
				g.log.Warn("enrollment refused: the token's certificate was revoked; it does not enrol again", "token", j.req.Token, "peer", t.Node, "serial", t.Serial, "from", j.from)
				g.metrics.enrollment("refused")
				j.finish(nil, &enrollRefusal{fmt.Errorf("the certificate this token was enrolled with (serial %s) is revoked: the token does not enrol again", t.Serial)})
				continue
			}
			a.cert = t.issued(j.key)
		} else {
			if used == nil {
				used = g.overlayIPsInUse(e)
			}
			if ip, err = pickOverlayIP(tb.MeshPrefix(), used); err != nil {
				j.finish(nil, err)
				continue
			}
			used[ip] = true // not for another of the batch
		}
		routes, err := certs.ParseRoutes(rec.Routes)
		if err != nil {
			j.finish(nil, fmt.Errorf("burst record of %s: %w", rec.Site, err))
			continue
		}
		a.attrs = certs.Attributes{Node: rec.nodeName(i), Site: rec.Site, Region: rec.Region, Provider: rec.Provider,
			Jurisdiction: rec.Jurisdiction, OverlayIP: ip, Routes: routes, Labels: rec.Labels}
		all = append(all, a)
		if a.cert == nil {
			issue = append(issue, a)
		}
	}
	if len(all) == 0 {
		return later
	}
	// Everything that can fail comes before the certificates and the
	// tokens' use, which is final.
	kr, err := g.prov.Secrets().GossipKeyring(context.Background())
	if err != nil {
		for _, a := range all {
			a.fail(fmt.Errorf("gossip keyring: %w", err))
		}
		return later
	}
	for _, a := range all {
		if a.cert != nil {
			// Nothing is issued, nothing revoked: a holder of the token and
			// the key that asks again and again costs the CA's index and the
			// mesh's revocation list nothing.
			g.log.Info("burst gateway asked again for its enrollment (its answer was lost): the certificate it was issued is sent again", "peer", a.attrs.Node, "peer_site", a.rec.Site, "from", a.j.from, "serial", a.t.Serial)
		}
	}
	if len(issue) > 0 {
		g.issueEnrolled(issue, now)
	}
	cas, seeds := tb.CAPEM(), g.seedsForNewcomer()
	var crl []byte
	if c := tb.CRL(); c != nil {
		crl = pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: c.Raw})
	}
	for _, a := range all {
		if a.failed {
			continue
		}
		g.metrics.enrollment("enrolled")
		g.log.Info("burst gateway enrolled", "peer", a.attrs.Node, "peer_site", a.rec.Site, "overlay_ip", a.attrs.OverlayIP.String(), "from", a.j.from,
			"serial", a.t.Serial, "until", a.rec.Expires)
		a.j.finish(&enrollResponse{
			Certificate: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cert.Raw}),
			CAs:         cas, CRL: crl, Keyring: kr.MarshalSecret(), Seeds: seeds, Expires: a.rec.Expires,
		}, nil)
	}
	return later
}

// issueEnrolled certifies the newcomers of a batch, each until its burst
// ends, and records their tokens used; those it fails have failed.
func (g *Gateway) issueEnrolled(issue []*enrolling, now time.Time) {
	e := g.enroll
	reqs := make([]certs.IssueRequest, len(issue))
	for k, a := range issue {
		// The identity ends with the burst.
		reqs[k] = certs.IssueRequest{Attributes: a.attrs, PublicKey: a.j.csr.PublicKey, TTL: a.rec.Expires.Sub(now), Now: now}
	}
	issued, errs, err := e.ca.IssueMany(reqs)
	var recorded []*enrolling
	for k, a := range issue {
		switch {
		case err != nil:
			a.fail(fmt.Errorf("certify %s: %w", a.attrs.Node, err))
		case errors.Is(errs[k], certs.ErrIssueRefused):
			// Asking again will not change it (a route another site took
			// since the burst opened, say): the newcomer is told, at once.
			g.log.Warn("enrollment refused: the CA refuses the certificate", "token", a.j.req.Token, "peer", a.attrs.Node, "from", a.j.from, "err", errs[k])
			g.metrics.enrollment("refused")
			a.fail(&enrollRefusal{fmt.Errorf("the mesh CA refuses %s's certificate: %w", a.attrs.Node, errs[k])})
		case errs[k] != nil:
			a.fail(fmt.Errorf("certify %s: %w", a.attrs.Node, errs[k]))
		default:
			a.cert, a.before = issued[k], *a.t
			t := a.t
			used := now.UTC()
			if a.again {
				used = *t.Used
			}
			t.Used, t.Node, t.OverlayIP, t.Serial, t.Key, t.Cert = &used, a.attrs.Node, a.attrs.OverlayIP.String(), certs.FormatSerial(a.cert.SerialNumber), a.j.key, a.cert.Raw
			recorded = append(recorded, a)
		}
	}
	if len(recorded) == 0 {
		return
	}
	if err := g.state.saveBursts(e.book); err != nil {
		// Unrecorded, the tokens would work again: take the certificates back.
		var serials []*big.Int
		for _, a := range recorded {
			*a.t = a.before
			serials = append(serials, a.cert.SerialNumber)
		}
		if _, rerr := e.ca.RevokeSerials(serials, "cessationOfOperation", now); rerr != nil {
			var ss []string
			for _, s := range serials {
				ss = append(ss, certs.FormatSerial(s))
			}
			g.log.Error("enrollment: could not record the tokens nor revoke the certificates issued for them", "serials", ss, "err", rerr)
		}
		for _, a := range recorded {
			a.fail(fmt.Errorf("record enrollment: %w", err))
		}
		return
	}
	for _, a := range recorded {
		if !a.again {
			continue
		}
		// Enrolled by a release that kept no certificate: it is
		// issued once more, and kept from now on.
		if old, err := certs.ParseSerial(a.before.Serial); err == nil {
			if _, err := e.ca.RevokeSerials([]*big.Int{old}, "superseded", now); err != nil {
				// The burst's end revokes it with the rest (its strays).
				g.log.Warn("enrollment asked again: the certificate it supersedes is not revoked yet", "serial", a.before.Serial, "err", err)
			}
		}
		g.log.Info("burst gateway asked again for its enrollment (its answer was lost), enrolled before its certificate was kept: certificate re-issued for the same key", "peer", a.attrs.Node, "peer_site", a.rec.Site, "from", a.j.from, "superseded", a.before.Serial)
	}
}

// enrollRefusal is an enrollment refused for what the newcomer sent (its
// token, its CSR): final, unlike a failure on our side.
type enrollRefusal struct{ error }

func (e *enrollRefusal) Unwrap() error { return e.error }

func parseEnrollCSR(b []byte) (*x509.CertificateRequest, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("enrollment request carries no PEM certificate request")
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certificate request: %w", err)
	}
	// The key's kind first: this is before the token's secret is
	// checked, and a signature under a key of any size is anyone's to
	// send (an RSA modulus of 144,000 bits took 1.6 s of CPU to verify).
	if err := certs.CheckNodeKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate request is not signed by its key: %w", err)
	}
	return csr, nil
}

// overlayIPsInUse are the addresses a new burst gateway must not take:
// every member's, every valid certificate's in the CA's index, and those
// handed to burst gateways.
func (g *Gateway) overlayIPsInUse(e *enrollment) map[netip.Addr]bool {
	used := map[netip.Addr]bool{g.id.Load().Attributes().OverlayIP: true}
	for _, m := range g.members.snapshot() {
		if m.Advert != nil {
			used[m.Advert.OverlayIP] = true
		}
	}
	now := g.now()
	if e.ca == nil {
		// Vault: its certificates are not listed here; the members and
		// the bursts' assignments are what we know.
	} else if issued, err := e.ca.Issued(); err == nil {
		for _, c := range issued {
			if a, err := netip.ParseAddr(c.OverlayIP); err == nil && c.RevokedAt == nil && c.NotAfter.After(now) {
				used[a] = true
			}
		}
	}
	for _, r := range e.book.Bursts {
		for _, t := range r.Tokens {
			if a, err := netip.ParseAddr(t.OverlayIP); err == nil && r.active(now) {
				used[a] = true
			}
		}
	}
	return used
}

// seedsForNewcomer are the gossip addresses a burst gateway joins
// through: ours and up to seven live verified members'.
func (g *Gateway) seedsForNewcomer() []string {
	out := []string{g.s.GossipAdvertise.String()}
	for _, m := range g.members.snapshot() {
		if len(out) == 8 {
			break
		}
		if m.State == StateVerified && m.Alive && m.Gossip.IsValid() {
			out = append(out, m.Gossip.String())
		}
	}
	return out
}

// BurstGrant answers `skybridge burst up`: the tokens (secrets: printed
// once, kept nowhere) and what the policy lets the site hold.
type BurstGrant struct {
	Site         string         `json:"site"`
	Expires      time.Time      `json:"expires"`
	TokenExpires time.Time      `json:"token_expires"`
	Tokens       []string       `json:"tokens"`
	Endpoint     string         `json:"endpoint"`
	Classes      []ClassVerdict `json:"classes"`
}

// ClassVerdict is the policy's answer to "may data of this class be
// stored at the burst site?".
type ClassVerdict struct {
	Class   string   `json:"class"`
	Allowed bool     `json:"allowed"`
	Audit   bool     `json:"audit,omitempty"` // allowed only because audit mode records the rules' denial
	Rule    string   `json:"rule"`
	Reasons []string `json:"reasons,omitempty"`
}

// errNoBursts is the answer of a gateway that cannot open burst sites.
var errNoBursts = errors.New("this gateway does not open burst sites: use a gateway whose identity block has ca_dir (and whose enroll block is not off), or one backed by Vault")

// BurstUp opens a burst site and makes its join tokens.
func (g *Gateway) BurstUp(ctx context.Context, req BurstRequest) (_ *BurstGrant, err error) {
	e := g.enroll
	if e == nil {
		return nil, errNoBursts
	}
	tb := g.trust.Load()
	attrs, err := req.attributes(tb.MeshPrefix())
	if err != nil {
		return nil, err
	}
	if req.Gateways == 0 {
		req.Gateways = 1
	}
	if err := g.checkBurstSite(attrs, req.Gateways); err != nil {
		return nil, err
	}
	now := g.now()
	expires := now.Add(req.TTL)
	if e.vault == nil {
		// The CA refuses routes any other site's gateway holds, offline
		// ones too, which the mesh does not see: refused here, not at
		// every enrollment once the tokens are out.
		a := attrs
		a.Node = "" // attrs names a placeholder node, which must not pass for one of ours
		if err := e.ca.RoutesFree(a, now); err != nil {
			return nil, fmt.Errorf("burst site %s: %w", attrs.Site, err)
		}
		issued, err := e.ca.Issued()
		if err != nil {
			return nil, err
		}
		if err := burstNamesFree(issued, attrs.Site, req.Gateways, now); err != nil {
			return nil, fmt.Errorf("burst site %s: %w", attrs.Site, err)
		}
		// Its gateways' certificates end with it, and none outlives the CA.
		if end := e.ca.Certificate().NotAfter; expires.After(end) {
			return nil, fmt.Errorf("burst site %s would run until %s, past the end of the mesh CA (%s): choose a shorter --ttl", attrs.Site,
				expires.UTC().Format(time.RFC3339), end.UTC().Format(time.RFC3339))
		}
	}
	if req.TokenTTL == 0 {
		req.TokenTTL = DefaultTokenTTL
	}
	tokExp := now.Add(req.TokenTTL)
	if expires.Before(tokExp) {
		tokExp = expires
	}
	grant := &BurstGrant{Site: attrs.Site, Expires: expires.UTC(), TokenExpires: tokExp.UTC(), Classes: g.classVerdicts(attrs, now)}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.book.check(attrs); err != nil { // before anything is made in Vault
		return nil, err
	}
	var toks []*certs.JoinToken
	var vb *certs.VaultBurst
	if e.vault != nil {
		grant.Endpoint = "vault"
		toks, vb, err = g.vaultTokens(ctx, e, req, attrs, expires, tokExp)
		if vb != nil {
			// Opened in Vault: whatever fails from here on (making the
			// tokens included) removes it again.
			defer e.abortVaultBurst(ctx, req.VaultToken, attrs.Site, vb.Claim, g.self.Load().node(), vb.Nodes(), &err)
		}
		if err != nil {
			return nil, err
		}
	} else {
		grant.Endpoint = g.s.EnrollAdvertise.String()
		for range req.Gateways {
			t, err := certs.NewJoinToken(attrs.Site, e.ca.Certificate(), []netip.AddrPort{g.s.EnrollAdvertise}, tokExp)
			if err != nil {
				return nil, err
			}
			t.Enroller = g.id.Load().Attributes().Node
			toks = append(toks, t)
		}
	}
	for _, t := range toks {
		grant.Tokens = append(grant.Tokens, t.Encode())
	}
	r, err := e.book.open(req, attrs, toks, now)
	if err != nil {
		return nil, err
	}
	if vb != nil {
		r.VaultClaim, r.VaultPlace = vb.Claim, &vb.Place
	}
	if err := g.state.saveBursts(e.book); err != nil {
		e.book.Bursts = e.book.Bursts[:len(e.book.Bursts)-1]
		return nil, fmt.Errorf("record burst: %w", err)
	}
	g.log.Info("burst site opened", "burst_site", attrs.Site, "until", expires, "gateways", req.Gateways, "token_ids", tokenIDs(toks))
	return grant, nil
}

func tokenIDs(ts []*certs.JoinToken) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.ID
	}
	return out
}

// checkBurstSite refuses a burst that would impersonate a site the mesh
// already has, name a gateway like an existing one, or claim prefixes
// another site routes (open bursts are checked by the book).
func (g *Gateway) checkBurstSite(a certs.Attributes, gateways int) error {
	self := g.id.Load().Attributes()
	nodes := append(g.members.gateways(), Node{Attributes: self})
	// And the gateways away, by their last certificate: a site whose
	// gateways are down is still a site (Vault, unlike the embedded CA,
	// keeps no index to ask), and a burst of its name would be taken for
	// it when they return.
	away := map[string]bool{}
	tb, now := g.trust.Load(), g.now()
	for _, m := range g.members.snapshot() {
		if m.Alive || m.LastCert == nil {
			continue
		}
		c, err := x509.ParseCertificate(m.LastCert)
		if err != nil {
			continue
		}
		at, err := certs.AttributesOf(c)
		// One retired (an ended burst's gateway, revoked at its down, or
		// expired a while ago) will not be back; until then its site is
		// missed, its routes held, and no burst takes its place.
		if err != nil || !now.Before(retiredAt(&certs.Verified{Cert: c, Attributes: at})) || tb.IsRevoked(c.SerialNumber) {
			continue
		}
		nodes = append(nodes, Node{Attributes: at})
		away[at.Node] = true
	}
	names := map[string]bool{}
	for i := range gateways {
		names[burstNodeName(a.Site, i)] = true
	}
	for _, n := range nodes {
		which := "gateway " + n.Attributes.Node
		if away[n.Attributes.Node] {
			which += ", away now"
		}
		if names[n.Attributes.Node] {
			return fmt.Errorf("%s of site %s already has the name a gateway of burst site %s would get: choose another site name", which, n.Attributes.Site, a.Site)
		}
		if n.Attributes.Site == a.Site {
			return fmt.Errorf("site %s already exists (%s): a burst site needs a name of its own", a.Site, which)
		}
		for _, r := range a.Routes {
			for _, o := range n.Attributes.Routes {
				if r.Overlaps(o) {
					return fmt.Errorf("route %s overlaps %s of site %s (%s): a burst site needs prefixes of its own", r, o, n.Attributes.Site, which)
				}
			}
		}
	}
	return nil
}

// classVerdicts asks the policy in force, for each class it defines,
// whether the burst site may store it: whether data of the class may
// rest there, and travel into it, which a migration's sender judges for
// every site of its path, the destination's included. A site allowed to
// store a class its policy forbids to travel there (a deny "transit" for
// burst sites, say) was listed as allowed, and every migration there of
// the class refused.
func (g *Gateway) classVerdicts(a certs.Attributes, now time.Time) []ClassVerdict {
	ap := g.policy.Load()
	if ap == nil {
		return nil
	}
	site := policy.SiteOf(&a)
	var out []ClassVerdict
	for _, c := range ap.p.Classes() {
		d := ap.p.Evaluate(policy.Request{Class: c, Action: policy.Store, Sites: []policy.Site{site}, Time: now})
		// The transit verdict decides when it is the worse of the two:
		// denied, or let through by audit mode alone where the store is
		// allowed outright.
		if t := ap.p.Evaluate(policy.Request{Class: c, Action: policy.Transit, Sites: []policy.Site{site}, Time: now}); d.Allowed && (!t.Allowed || t.Audit && !d.Audit) {
			d = t
		}
		out = append(out, ClassVerdict{Class: c, Allowed: d.Allowed, Audit: d.Audit, Rule: d.Rule.String(), Reasons: d.Reasons})
	}
	return out
}

// BurstInfo describes a burst site for `skybridge burst list` and down.
type BurstInfo struct {
	BurstSite
	BurstLife
	Gateways []BurstGateway `json:"gateways"`
	// TokensUnused can still enrol a gateway; TokensVoid were never used
	// and no longer can (expired, or the burst ended).
	TokensUnused int `json:"tokens_unused"`
	TokensVoid   int `json:"tokens_void"`
	// Of burst down: the serials it revoked, and the unused tokens it
	// made void (counted in TokensVoid too).
	Revoked      []string `json:"revoked,omitempty"`
	TokensVoided int      `json:"tokens_voided,omitempty"`
	// WorkLeft: the burst has ended, but `burst down` still has work to
	// do — a Vault burst's objects (and its claim on the site) are still
	// in Vault, or its certificates were not revoked.
	WorkLeft bool `json:"work_left,omitempty"`
	// Of burst down: what it could not do, left to the operator (Vault's
	// CRL not rebuilt, say).
	Warnings []string `json:"warnings,omitempty"`
	// AlreadyEnded: burst down found the burst ended and cleaned up
	// already (its TTL, or an earlier burst down): nothing was done.
	AlreadyEnded bool `json:"already_ended,omitempty"`
}

// BurstGateway is a gateway enrolled into a burst site.
type BurstGateway struct {
	Node      string     `json:"node"`
	OverlayIP string     `json:"overlay_ip"`
	Serial    string     `json:"serial,omitempty"`
	Enrolled  *time.Time `json:"enrolled,omitempty"` // unknown for Vault bursts: Vault admits them
}

func (r *burstRecord) info(now time.Time) BurstInfo {
	bi := BurstInfo{BurstSite: r.BurstSite, BurstLife: r.BurstLife, Gateways: []BurstGateway{}, WorkLeft: r.Ended != nil && r.workLeft()}
	for _, t := range r.Tokens {
		if t.Used == nil && !r.Vault {
			if r.active(now) && now.Before(t.Expires) {
				bi.TokensUnused++
			} else {
				bi.TokensVoid++
			}
			continue
		}
		bi.Gateways = append(bi.Gateways, BurstGateway{Node: t.Node, OverlayIP: t.OverlayIP, Serial: t.Serial, Enrolled: t.Used})
	}
	return bi
}

// Bursts lists the burst sites this gateway opened, newest first.
func (g *Gateway) Bursts() ([]BurstInfo, error) {
	e := g.enroll
	if e == nil {
		return nil, errNoBursts
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []BurstInfo{}
	now := g.now()
	for _, r := range slices.Backward(e.book.Bursts) {
		out = append(out, r.info(now))
	}
	return out, nil
}

// BurstDown ends a burst site now. With Vault, vaultToken is an
// operator's token that may revoke certificates and delete what burst up
// created.
func (g *Gateway) BurstDown(ctx context.Context, site, vaultToken string) (*BurstInfo, error) {
	e := g.enroll
	if e == nil {
		return nil, errNoBursts
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	r := e.book.find(site)
	if r == nil {
		// An ended burst with work left: an expired Vault burst whose Vault
		// objects were not removed (that takes an operator's token), or a
		// burst whose certificates could not be revoked when it ended.
		for _, b := range slices.Backward(e.book.Bursts) {
			if b.Site == site && b.workLeft() {
				r = b
				break
			}
		}
	}
	if r != nil {
		var here *certs.VaultBurstPlace
		if e.vault != nil {
			p := e.vault.BurstPlace(site)
			here = &p
		}
		if err := r.vaultUnreachable(here, g.now()); err != nil {
			return nil, err
		}
	}
	if r == nil {
		// Ended and cleaned up already: done, as asked — a burst down
		// retried (its answer lost, a script run again) must not fail.
		for _, b := range slices.Backward(e.book.Bursts) {
			if b.Site == site {
				bi := b.info(g.now())
				bi.AlreadyEnded = true
				return &bi, nil
			}
		}
		var open []string
		for _, r := range e.book.Bursts {
			if r.Ended == nil {
				open = append(open, r.Site)
			}
		}
		sort.Strings(open)
		return nil, fmt.Errorf("no open burst site %q here (open: %v)", site, open)
	}
	before := r.info(g.now()) // the tokens this down makes void
	var revoked, warnings []string
	var err error
	if r.Vault {
		revoked, warnings, err = g.endVaultBurstLocked(ctx, r, vaultToken)
	} else {
		revoked, err = g.endBurstLocked(r, "ended by burst down")
	}
	if err != nil {
		return nil, err
	}
	bi := r.info(g.now())
	bi.Revoked, bi.TokensVoided, bi.Warnings = revoked, before.TokensUnused, warnings
	return &bi, nil
}

// endBurstLocked ends a burst: the record first (no token works after
// it), then the revocation of its certificates, which the mesh adopts
// from us by gossip; the burst's gateways leave when they see it.
func (g *Gateway) endBurstLocked(r *burstRecord, reason string) ([]string, error) {
	e := g.enroll
	now := g.now()
	var strays []string
	if e.ca != nil && !r.Vault {
		issued, err := e.ca.Issued()
		if err != nil {
			return nil, fmt.Errorf("read the CA index for the certificates of burst %s: %w", r.Site, err)
		}
		if strays = r.strays(issued, now); len(strays) > 0 {
			g.log.Warn("burst site: the CA issued certificates its record does not name (an enrollment cut short); revoking them too", "burst_site", r.Site, "serials", strays)
		}
	}
	wasOpen, tokens := r.Ended == nil, slices.Clone(r.Tokens)
	serials := append(r.end(reason, now), strays...)
	if err := g.state.saveBursts(e.book); err != nil {
		if wasOpen { // still open on disk: keep it open here, so it can be ended again
			// With the certificates end forgot: a gateway that lost its
			// answer is sent its own again, not issued another.
			r.Ended, r.EndReason, r.Tokens = nil, "", tokens
		}
		return nil, fmt.Errorf("record the end of burst %s: %w", r.Site, err)
	}
	var ss []*big.Int
	for _, s := range serials {
		n, err := certs.ParseSerial(s)
		if err != nil {
			return nil, err
		}
		ss = append(ss, n)
	}
	g.log.Info("burst site ended", "burst_site", r.Site, "reason", reason, "revoking", len(ss))
	if r.Vault {
		// Vault admitted its gateways: their certificates end now (the
		// role's not_after), their SecretIDs with them. What stays in
		// Vault grants nothing; `skybridge burst down` removes it.
		g.log.Info("the burst's role, policy and AppRole stay in Vault until `skybridge burst down --site " + r.Site + "` removes them")
		return nil, nil
	}
	if e.ca == nil {
		// Opened with the embedded CA, and this gateway's identity has
		// since moved to Vault: the CA that can revoke them is elsewhere.
		if !now.Before(r.Expires) {
			r.CertsRevoked = true // they ended with the burst: nothing is left to revoke
			return nil, g.state.saveBursts(e.book)
		}
		if len(ss) > 0 {
			return nil, fmt.Errorf("burst %s was opened with the embedded CA, which this gateway no longer uses: its %d certificates stay valid until %s unless revoked where the CA directory is: `skybridge ca revoke --ca DIR --reason cessationOfOperation --serial %s`",
				r.Site, len(ss), r.Expires.Format(time.RFC3339), strings.Join(serials, " --serial "))
		}
	}
	if len(ss) > 0 {
		if _, err := e.ca.RevokeSerials(ss, "cessationOfOperation", now); err != nil {
			return nil, fmt.Errorf("revoke the certificates of burst %s (`skybridge burst down --site %s` tries again): %w", r.Site, r.Site, err)
		}
		asked := time.Now()
		tb, err := e.ca.TrustBundle()
		if err != nil {
			return nil, err
		}
		g.adoptTrust(tb, asked)
	}
	r.CertsRevoked = true
	if err := g.state.saveBursts(e.book); err != nil {
		g.log.Warn("save bursts", "err", err) // revoking again later is harmless
	}
	return serials, nil
}

// stillValid reports whether the CA's index holds the certificate serial
// as neither revoked nor expired.
func stillValid(index []certs.IssuedCert, serial string, now time.Time) bool {
	for _, c := range index {
		if c.Serial == serial {
			return c.RevokedAt == nil && c.NotAfter.After(now)
		}
	}
	return false
}

// enrollerCertTTL is how long an enrollment endpoint's certificate lasts;
// a new one is issued once a third of that is left.
const enrollerCertTTL = 24 * time.Hour

// enrollerCert is the enrollment endpoint's certificate (certs.IssueEnroller),
// issued when first asked for, again before it runs out, and again once
// revoked, for a key kept in memory only.
type enrollerCert struct {
	ca  *certs.CA
	log *slog.Logger
	// revoked reports whether the revocation list this gateway holds
	// revokes a serial: `ca revoke --node` of this gateway revokes the
	// endpoint's certificate too, and renewing gateways, which check the
	// list, would refuse it until its renewal time, up to 16 hours on.
	// The list held in memory, not the CA's index: it is asked at every
	// handshake, and the renewing gateways see no revocation before it.
	revoked func(serial *big.Int) bool

	mu      sync.Mutex
	cert    *tls.Certificate
	node    string
	renewAt time.Time
}

func (e *enrollerCert) get(node string, ip netip.Addr, now time.Time) (*tls.Certificate, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cert != nil && e.node == node && now.Before(e.renewAt) {
		if e.revoked == nil || !e.revoked(e.cert.Leaf.SerialNumber) {
			return e.cert, nil
		}
		e.log.Warn("enrollment endpoint: its certificate was revoked; issuing another", "serial", certs.FormatSerial(e.cert.Leaf.SerialNumber))
	}
	key, err := certs.GenerateNodeKey()
	if err != nil {
		return nil, err
	}
	// Valid from as far back as a newcomer's clock may lag (the mesh's
	// allowance): a certificate issued a second ago would otherwise be
	// refused, for good, by a cloud VM whose clock is a minute behind.
	from := now.Add(-certs.MaxClockSkew)
	ttl := min(enrollerCertTTL, e.ca.Certificate().NotAfter.Sub(from)) // none outlives the CA
	c, err := e.ca.IssueEnroller(node, ip, key.Public(), ttl, from)
	if err != nil {
		e.log.Error("enrollment endpoint: issue its certificate", "err", err)
		return nil, err
	}
	e.cert = &tls.Certificate{Certificate: [][]byte{c.Raw, e.ca.Certificate().Raw}, PrivateKey: key, Leaf: c}
	// Again once a third of its life is left, however short the CA's
	// end made it.
	e.node, e.renewAt = node, c.NotAfter.Add(-c.NotAfter.Sub(now)/3)
	return e.cert, nil
}

// burstRetry is how often burstLoop tries again an end that failed.
const burstRetry = 30 * time.Second

// burstLoop ends bursts when their time is up, finishes ends cut short,
// and forgets those that ended long ago.
func (g *Gateway) burstLoop(ctx context.Context) {
	if g.enroll == nil {
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	failed := map[string]time.Time{}    // by site: an end that failed is tried again every burstRetry
	delisted := map[*burstRecord]bool{} // bursts whose certificates are off the list (delistEnded)
	var delistFailed time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e := g.enroll
		e.mu.Lock()
		now := g.now()
		for _, r := range e.book.due(now) {
			if at, ok := failed[r.Site]; ok && now.Sub(at) < burstRetry {
				continue
			}
			reason := "expired"
			if r.Ended != nil {
				reason = r.EndReason // its end, cut short: the revocation is what is left
				g.log.Warn("burst site ended, its certificates not yet revoked (the gateway stopped in between): revoking them now", "burst_site", r.Site)
			}
			if _, err := g.endBurstLocked(r, reason); err != nil {
				failed[r.Site] = now
				g.log.Error("end burst", "burst_site", r.Site, "err", err, "retry_in", burstRetry)
			} else {
				delete(failed, r.Site)
			}
		}
		if e.ca != nil && now.Sub(delistFailed) >= burstRetry {
			if err := g.delistEnded(e, now, delisted); err != nil {
				delistFailed = now
				g.log.Warn("the revocation list still names the certificates of bursts that have expired since", "err", err, "retry_in", burstRetry)
			}
		}
		if e.book.prune(now) {
			if err := g.state.saveBursts(e.book); err != nil {
				g.log.Warn("save bursts", "err", err)
			}
		}
		e.mu.Unlock()
	}
}

// delistEnded signs the revocation list anew once the certificates of a
// burst taken down before its end have expired: a list the CA signs
// leaves expired gateway certificates out, but this one was signed when
// they were revoked, and stayed in force until the next revocation by
// anyone, for days maybe. A burst of 2,000 gateways taken down left 98 KB
// of it that every gateway's state exchange carries every 15 s, and every
// enrollment answer. done holds the bursts looked at, each looked at once.
func (g *Gateway) delistEnded(e *enrollment, now time.Time, done map[*burstRecord]bool) error {
	for r := range done {
		if !slices.Contains(e.book.Bursts, r) { // pruned
			delete(done, r)
		}
	}
	tb := g.trust.Load()
	var due []*burstRecord
	listed := false
	for _, r := range e.book.Bursts {
		// Not before the list may leave them out (certs.MaxClockSkew
		// past their end): signed earlier, it would keep them, and none
		// would be signed again.
		if done[r] || r.Vault || !r.CertsRevoked || !now.After(r.Expires.Add(certs.MaxClockSkew)) {
			continue
		}
		due = append(due, r)
		for _, t := range r.Tokens {
			if s, err := certs.ParseSerial(t.Serial); err == nil && tb.IsRevoked(s) {
				listed = true
			}
		}
	}
	if listed {
		if err := e.ca.RefreshCRL(now); err != nil {
			return err
		}
		asked := time.Now()
		next, err := e.ca.TrustBundle()
		if err != nil {
			return err
		}
		g.adoptTrust(next, asked)
		var sites []string
		for _, r := range due {
			sites = append(sites, r.Site)
		}
		g.log.Info("revocation list signed anew without the certificates of bursts taken down, expired since", "burst_sites", sites)
	}
	for _, r := range due {
		done[r] = true
	}
	return nil
}

// refreshTrust adopts a newer revocation list from the issuer (a
// `skybridge ca revoke` on the CA directory, Vault's pki/revoke), which
// then spreads by gossip. Only gateways with an issuer look.
func (g *Gateway) refreshTrust(ctx context.Context) {
	iss := g.prov.Issuer()
	if iss == nil {
		return
	}
	every := g.prov.Refresh()
	t := time.NewTicker(every)
	defer t.Stop()
	failing := 0 // refreshes failed in a row
	// The first at once, unless the start just read the bundle: the
	// issuer's last answer is a metric, and a gateway that started
	// without its issuer should say so from the start.
	first := true
	if at := g.prov.IssuerAnswered(); !at.IsZero() {
		g.issuerAnswered.Store(at.Unix())
		first = false
	}
	for ; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		asked := time.Now()
		tb, err := iss.Trust(ctx)
		if err != nil {
			// Once is a blip; a few in a row means revocations made at
			// the issuer no longer reach the mesh through this gateway.
			if failing++; failing == trustRefreshWarnAfter {
				g.log.Warn("the issuer's revocation list cannot be read: revocations made there do not reach the mesh from this gateway", "failed_in_a_row", failing, "err", err)
			} else {
				g.log.Debug("refresh trust bundle", "err", err)
			}
			continue
		}
		if failing >= trustRefreshWarnAfter {
			g.log.Info("the issuer's revocation list can be read again", "failed_in_a_row", failing)
		}
		failing = 0
		if !certs.ReadWithoutLogin(iss) {
			// Read without a login (Vault refuses the gateway's), the
			// lists still come, but the issuer issues nothing: not an
			// answer, or its unreachable alert would never fire.
			g.issuerAnswered.Store(g.now().Unix())
		}
		g.adoptTrust(tb, asked)
		g.followRotation(every)
	}
}

// issuerRotation is an issuer's new signing CA that this gateway's certificate
// is not from: since when it is known, and whether a renewal was asked.
type issuerRotation struct {
	ca    *x509.Certificate
	since time.Time
	asked bool
}

// rotationSettle, in refresh intervals, is how long a gateway waits after
// it learns that the issuer signs with a new CA before it renews onto it:
// every gateway reads the issuer's CAs once per interval, and one that
// has not yet would refuse the new certificate.
const rotationSettle = 3

// followRotation renews the certificate onto the issuer's signing CA
// once every gateway has had time to trust it (an issuer rotated: Vault's
// root/rotate, then the new issuer made the default). Only refreshTrust
// calls it.
func (g *Gateway) followRotation(every time.Duration) {
	tb := g.trust.Load()
	s := tb.Signing()
	if s == nil || g.burst != nil || tb.SignedBySigning(g.id.Load().Certificate()) {
		g.newCA = issuerRotation{}
		return
	}
	now := g.now()
	if r := g.newCA; r.ca == nil || !bytes.Equal(r.ca.Raw, s.Raw) {
		wait := rotationSettle * every
		g.newCA = issuerRotation{ca: s, since: now}
		g.log.Info("the issuer signs with a new CA: this gateway renews its certificate onto it once every gateway has had time to trust it",
			"ca", s.Subject.CommonName, "serial", certs.FormatSerial(s.SerialNumber), "renew_in", wait)
		return
	}
	if g.newCA.asked || now.Sub(g.newCA.since) < rotationSettle*every {
		return
	}
	// Asked once per CA: a PKI role that pins the old issuer would
	// otherwise have it renewed at every refresh (renewed says so).
	g.newCA.asked = true
	select {
	case g.renewNow <- struct{}{}:
	default:
	}
}

// trustRefreshWarnAfter is how many refreshes in a row must fail before
// it is a warning.
const trustRefreshWarnAfter = 3

// vaultTokens sets the burst up in Vault and makes a Vault join token per
// gateway, each with its node name and overlay address decided here (the
// address claimed in Vault, which passes over one another burst holds). What
// Vault opened is returned, with an error too, once the burst is open
// there: the caller removes it if anything fails.
func (g *Gateway) vaultTokens(ctx context.Context, e *enrollment, req BurstRequest, attrs certs.Attributes, expires, tokExp time.Time) (_ []*certs.JoinToken, _ *certs.VaultBurst, err error) {
	used := g.overlayIPsInUse(e)
	prefix := g.trust.Load().MeshPrefix()
	nodes := make([]certs.Attributes, req.Gateways)
	for i := range nodes {
		ip, err := pickOverlayIP(prefix, used)
		if err != nil {
			return nil, nil, err
		}
		used[ip] = true
		n := attrs
		n.Node, n.OverlayIP = burstNodeName(attrs.Site, i), ip
		nodes[i] = n
	}
	// What this gateway sees leaves out the bursts other gateways opened
	// whose servers have not joined yet, and every gateway picks from the
	// top: Vault's claims on the addresses decide, and one another burst
	// holds there is passed over for the next free one.
	readdress := func(taken netip.Addr) (netip.Addr, error) {
		used[taken] = true
		ip, err := pickOverlayIP(prefix, used)
		if err == nil {
			used[ip] = true
		}
		return ip, err
	}
	vb, err := e.vault.OpenBurst(ctx, req.VaultToken, certs.VaultBurstSpec{Site: attrs.Site, Nodes: nodes, Expires: expires, TokenTTL: tokExp.Sub(g.now()),
		OpenedBy: g.self.Load().node(), Readdress: readdress})
	if err != nil {
		return nil, nil, err
	}
	common, err := e.vault.VaultJoinFor(vb)
	if err != nil {
		return nil, vb, err
	}
	common.Seeds = g.seedsForNewcomer()
	var toks []*certs.JoinToken
	for i, gw := range vb.Gateways {
		vj := *common
		vj.RoleID, vj.PKIRole, vj.WrappedSecretID, vj.Node = gw.RoleID, gw.Role, gw.WrappedSecretID, nodes[i]
		vj.Node.OverlayIP = gw.OverlayIP // the one it holds in Vault
		t, err := certs.NewVaultJoinToken(attrs.Site, &vj, tokExp)
		if err != nil {
			return nil, vb, err
		}
		toks = append(toks, t)
	}
	return toks, vb, nil
}

// abortVaultBurst removes, if *err is set, what Vault holds for a burst
// that failed after OpenBurst and before it was recorded: nothing else
// would remember to, and its grant has reached no one, so there is
// nothing to revoke.
func (e *enrollment) abortVaultBurst(ctx context.Context, vaultToken, site, claim, by string, nodes []string, err *error) {
	if *err == nil {
		return
	}
	if aerr := e.vault.AbortBurst(ctx, vaultToken, site, claim, by, nodes); aerr != nil {
		*err = fmt.Errorf("%w (and removing the burst from Vault: %v)", *err, aerr)
	}
}

// endVaultBurstLocked ends a Vault burst: Vault revokes the site's
// certificates and forgets its role, policy and AppRole; we adopt the new
// revocation list at once, and gossip spreads it.
func (g *Gateway) endVaultBurstLocked(ctx context.Context, r *burstRecord, vaultToken string) (revoked, warnings []string, _ error) {
	e := g.enroll
	var nodes []string
	for _, t := range r.Tokens {
		nodes = append(nodes, t.Node)
	}
	closed, err := e.vault.CloseBurst(ctx, vaultToken, r.Site, nodes, r.VaultClaim, g.self.Load().node())
	revoked, warnings = closed.Revoked, closed.Warnings
	reason := "ended by burst down"
	switch {
	case errors.Is(err, certs.ErrBurstSiteReopened):
		// Nothing of it is left in Vault to remove: done, or this
		// record would wait for a burst down that can never succeed.
		g.log.Warn("burst site opened again elsewhere after its Vault objects were removed by hand; recording this burst as ended", "burst_site", r.Site, "err", err)
		reason = "ended: its Vault objects were removed by hand and the site opened again"
	case err != nil:
		return revoked, warnings, err
	}
	now := g.now()
	r.end(reason, now)
	r.VaultCleaned = true
	if err := g.state.saveBursts(e.book); err != nil {
		return revoked, warnings, fmt.Errorf("record the end of burst %s: %w", r.Site, err)
	}
	g.log.Info("burst site ended", "burst_site", r.Site, "reason", r.EndReason, "revoked", len(revoked))
	asked := time.Now()
	if tb, err := e.vault.Trust(ctx); err == nil {
		g.adoptTrust(tb, asked)
	} else {
		g.log.Warn("fetch the revocation list from vault; gateways will pick it up on their next refresh", "err", err)
	}
	return revoked, warnings, nil
}
