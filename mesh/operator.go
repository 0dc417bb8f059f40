package mesh

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/internal/throttle"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// The operator endpoint serves Prometheus metrics and a read-only
// dashboard over HTTP. Everything on it, the metrics included, needs the
// gateway's operator token: as a bearer token (Prometheus'
// authorization.credentials_file), or, for a browser, once in the URL of
// the link `skybridge dashboard` prints, which trades it for an HttpOnly
// cookie and redirects to a URL without it.

//go:embed ui
var uiFiles embed.FS

const (
	sessionCookie   = "skybridge_session_" // and the port: browsers share cookies between the ports of a host
	sessionLifetime = 12 * time.Hour
	maxSessions     = 256         // logins remembered; past them the oldest is forgotten
	maxOperatorConn = 64          // connections served at once, before any is authenticated
	dashboardEvery  = time.Second // how often the live view is refreshed
	recentSends     = 20          // finished migrations the dashboard lists
	operatorHeaders = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

// maxOperatorPerSource bounds the connections of one address (an IPv6
// /64, but a gateway's own overlay address), so that one client holding
// connections open without a word cannot take every slot from the
// token's holders. Prometheus and a browser often
// share an address (loopback, or one host on a site network): a browser
// opens up to 6 connections to the endpoint, its event stream among them,
// and a scraper one or two, which leaves room for a curl and another tab.
const maxOperatorPerSource = 16

// maxEventStream is how long an event stream runs; then the browser
// reconnects, and is authenticated again. A variable for tests.
var maxEventStream = 10 * time.Minute

// operatorToken loads the token, creating it (0600) on first start.
func operatorToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		raw := make([]byte, 32)
		rand.Read(raw)
		tok := base64.RawURLEncoding.EncodeToString(raw)
		if err := atomicfile.WriteNew(path, []byte(tok+"\n"), 0o600); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create operator token %s: %w", path, err)
		}
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return "", fmt.Errorf("operator token: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("operator token %s is open to other users (mode %04o): run chmod 600 %s", path, fi.Mode().Perm(), path)
	} else if err != nil {
		return "", fmt.Errorf("operator token: %w", err) // gone since it was read
	} else if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		// Another user who could write the directory could have put it
		// there with a token of their choosing.
		return "", fmt.Errorf("operator token %s belongs to uid %d, not to this gateway's user (uid %d): delete it and restart to get a new one, or chown it", path, st.Uid, os.Geteuid())
	}
	tok := strings.TrimSpace(string(b))
	if n := utf8.RuneCountInString(tok); n < 16 {
		return "", fmt.Errorf("operator token %s is too short to be secret (%d characters, want at least 16): delete it and restart to get a new one", path, n)
	}
	// A file of zeros or binary garbage (a crash, a bad restore) is not a
	// secret anyone chose: control characters and bytes that are not
	// UTF-8 are refused, and so are invisible ones (a byte-order mark an
	// editor saved, a zero-width space), which no one typing or pasting
	// the token would send. Spaces and letters are not: a token an
	// operator wrote, shared by several gateways, worked before they were
	// checked for, and is sent escaped in links and as it is in
	// Authorization headers (ASCII is what every client sends alike).
	if !utf8.ValidString(tok) {
		return "", fmt.Errorf("operator token %s is not text (bytes that are not UTF-8): it is damaged; if the gateway made it, delete it and restart to get a new one; if you wrote it, write it again", path)
	}
	for _, c := range tok {
		if unicode.IsControl(c) || unicode.Is(unicode.Cf, c) {
			return "", fmt.Errorf("operator token %s holds an invisible or control character (%U): if the gateway made it, it is damaged: delete it and restart to get a new one; if you wrote it, write it again without it", path, c)
		}
	}
	return tok, nil
}

// operator is the running endpoint.
type operator struct {
	g      *Gateway
	token  []byte
	cookie string // the session cookie's name
	addr   net.Addr

	// Sessions, by the SHA-256 of their cookie's value, with when each
	// began: one per login, random, so a cookie jar never holds the token;
	// each ends after sessionLifetime here, not only in the browser
	// (browsers send a host's cookies to all its ports: a cookie that
	// reached another service must not work for ever), and a restart
	// ends them all.
	sessMu   sync.Mutex
	sessions map[[32]byte]time.Time

	// The latest dashboard snapshot, shared by every open page: each
	// asks once a second, and a snapshot reads the device, the membership
	// and the migration journal.
	snapMu sync.Mutex
	snap   []byte
	snapAt time.Time
}

// snapshot returns the dashboard as JSON, taken afresh at most twice per
// dashboardEvery whatever the number of pages.
func (o *operator) snapshot() ([]byte, error) {
	o.snapMu.Lock()
	defer o.snapMu.Unlock()
	if o.snap != nil && time.Since(o.snapAt) < dashboardEvery/2 {
		return o.snap, nil
	}
	d, err := o.g.Dashboard()
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(d)
	if err != nil {
		return nil, err
	}
	o.snap, o.snapAt = b, time.Now()
	return b, nil
}

func (g *Gateway) serveOperator(ctx context.Context) (io.Closer, error) {
	if !g.s.OperatorAddr.IsValid() {
		return closerFunc(func() error { return nil }), nil
	}
	tok, err := operatorToken(g.s.OperatorTokenFile)
	if err != nil {
		return nil, err
	}
	addr := g.s.OperatorAddr
	var ln net.Listener
	if g.s.OperatorOverlay {
		addr = netip.AddrPortFrom(g.id.Load().Attributes().OverlayIP, addr.Port())
		ln, err = g.dev.Listen(addr)
	} else {
		ln, err = net.Listen("tcp", addr.String())
	}
	if err != nil {
		return nil, fmt.Errorf("operator endpoint on %s: %w (set operator { listen = ... } to another port, or \"off\")", addr, err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	op := &operator{g: g, token: []byte(tok), cookie: sessionCookie + port, addr: ln.Addr(), sessions: map[[32]byte]time.Time{}}
	g.operatorTok.Store(&tok)
	g.operator.Store(op)
	g.operatorAddr.Store(&op.addr)
	// Bounded reads and idle waits: a connection that sends one request
	// (refused without the token) and then nothing held its descriptor
	// and goroutine for good. No write timeout: the event stream is long;
	// each of its writes has a deadline of its own.
	// A refused request's connection is closed (refuse), so that the
	// connection slots, counted before anyone is authenticated, are not
	// held by anyone without the token.
	srv := &http.Server{Handler: op.routes(), ReadHeaderTimeout: 2 * time.Second, ReadTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	// Counted per source before the slots, so that a connection turned
	// away takes none. On loopback every local user shares 127.0.0.1 (or
	// picks another 127/8 address), so this bounds the clients of the
	// site networks that reach the overlay address, not a local one.
	var warnCrowded throttle.PerSecond
	perSource := limitPerSource(ln, maxOperatorPerSource, func(from netip.Addr) {
		if ok, dropped := warnCrowded.Allow(); ok {
			g.log.Warn("operator connection turned away: its address has as many open as one may; if it is your scraper or browser, look for another client on that host holding connections open",
				"from", from, "open", maxOperatorPerSource, "turned_away_unlogged", dropped)
		}
	})
	if g.s.OperatorOverlay {
		// With an IPv6 overlay, every gateway would share one /64's share.
		perSource.exact = g.trust.Load().MeshPrefix()
	}
	go srv.Serve(netutil.LimitListener(perSource, maxOperatorConn))
	g.log.Info("operator endpoint: metrics and dashboard (token required)", "address", ln.Addr().String())
	return closerFunc(func() error {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return srv.Shutdown(c)
	}), nil
}

// OperatorAddress is where the operator endpoint listens (nil: off or not
// started).
func (g *Gateway) OperatorAddress() net.Addr {
	if a := g.operatorAddr.Load(); a != nil {
		return *a
	}
	return nil
}

// OperatorLink is how to reach the operator endpoint. It holds the token:
// only the control socket (the gateway's own user) hands it out.
type OperatorLink struct {
	Address   string `json:"address"`
	Dashboard string `json:"dashboard"` // URL with the token, for a browser
	Metrics   string `json:"metrics"`   // URL for Prometheus (bearer token from TokenFile)
	TokenFile string `json:"token_file"`
}

func (g *Gateway) operatorLink() (*OperatorLink, error) {
	a, tok := g.OperatorAddress(), g.operatorTok.Load()
	if a == nil || tok == nil {
		return nil, errors.New("the operator endpoint is off (operator { listen = \"off\" } in the configuration)")
	}
	// The token the endpoint runs with, not the file's current content:
	// the link must open the page even if the file was replaced since.
	base := "http://" + a.String()
	return &OperatorLink{Address: a.String(), Dashboard: base + "/?token=" + url.QueryEscape(*tok), Metrics: base + "/metrics", TokenFile: g.s.OperatorTokenFile}, nil
}

func (o *operator) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(o.g.metrics.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError,
		ErrorLog: slog.NewLogLogger(o.g.log.Handler(), slog.LevelWarn)}))
	static, _ := fs.Sub(uiFiles, "ui")
	files := http.FileServerFS(static)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/dashboard.html"
		files.ServeHTTP(w, r2)
	})
	mux.Handle("GET /ui/", http.StripPrefix("/ui/", files))
	mux.HandleFunc("GET /api/v1/dashboard", func(w http.ResponseWriter, r *http.Request) {
		b, err := o.snapshot()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		// b is every page's: appended to, it would be written by
		// requests at once wherever it has room.
		w.Write(b)
		w.Write([]byte{'\n'})
	})
	mux.HandleFunc("GET /api/v1/events", o.events)
	mux.HandleFunc("GET /api/v1/graph", o.g.serveGraph)
	return o.authenticate(mux)
}

// authenticate admits a request with the bearer token or the session
// cookie; a browser's first visit carries ?token= and is redirected.
//

func (o *operator) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", operatorHeaders)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		if t := r.URL.Query().Get("token"); t != "" && r.Method == http.MethodGet {
			if !o.validToken(t) {
				o.refuse(w, r, "the token in the link is not this gateway's")
				return
			}
			http.SetCookie(w, &http.Cookie{Name: o.cookie, Value: o.login(), Path: "/", MaxAge: int(sessionLifetime.Seconds()), HttpOnly: true, SameSite: http.SameSiteStrictMode})
			q := r.URL.Query()
			q.Del("token")
			u := *r.URL
			u.RawQuery = q.Encode()
			http.Redirect(w, r, u.RequestURI(), http.StatusSeeOther)
			return
		}
		if bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
			if o.validToken(strings.TrimSpace(bearer)) {
				next.ServeHTTP(w, r)
				return
			}
			o.refuse(w, r, "wrong bearer token")
			return
		}
		if c, err := r.Cookie(o.cookie); err == nil && o.inSession(c.Value) {
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), sessionKey{}, c.Value)))
			return
		}
		o.refuse(w, r, "no token")
	})
}

// sessionKey marks, in a request's context, the session that admitted it
// (a request with the token has none).
type sessionKey struct{}

func (o *operator) validToken(t string) bool {
	return subtle.ConstantTimeCompare([]byte(t), o.token) == 1
}

func (o *operator) refuse(w http.ResponseWriter, r *http.Request, why string) {
	o.g.log.Debug("operator request refused", "remote", r.RemoteAddr, "path", r.URL.Path, "why", why)
	w.Header().Set("WWW-Authenticate", `Bearer realm="skybridge"`)
	w.Header().Set("Connection", "close")
	msg := "skybridge: this gateway's operator token is required (" + why + ").\n" +
		"Open the link that `skybridge dashboard --config FILE` prints on the gateway's host, " +
		"or send Authorization: Bearer <token> (the token is in the gateway's operator.token).\n"
	http.Error(w, msg, http.StatusUnauthorized)
}

// events streams the dashboard as server-sent events, one snapshot per
// second, until the browser goes away.
func (o *operator) events(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Accel-Buffering", "no")
	t := time.NewTicker(dashboardEvery)
	defer t.Stop()
	rc := http.NewResponseController(w)
	// A stream opened with a session ends with it (a session is checked
	// when a request begins, and this one does not end), and any stream
	// after maxEventStream: the browser's EventSource reconnects, with
	// whatever it holds then.
	session, _ := r.Context().Value(sessionKey{}).(string) // "": the token
	end := time.Now().Add(maxEventStream)
	for {
		if session != "" && !o.inSession(session) || time.Now().After(end) {
			return
		}
		// A browser that stops reading is let go, not written to for good.
		rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if b, err := o.snapshot(); err != nil {
			// Not "error": EventSource takes that name for a broken
			// stream, and the page would say it reconnects.
			fmt.Fprintf(w, "event: failure\ndata: %s\n\n", strings.NewReplacer("\r", " ", "\n", " ").Replace(err.Error()))
		} else {
			fmt.Fprintf(w, "event: snapshot\ndata: %s\n\n", b)
		}
		if rc.Flush() != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
		}
	}
}

// Dashboard is everything the dashboard shows, in one snapshot.
type Dashboard struct {
	Time      time.Time          `json:"time"`
	Status    *Status            `json:"status"`
	Graph     *MeshGraph         `json:"graph"`
	SVG       string             `json:"svg"`
	Sending   []MigrationView    `json:"sending"`
	Receiving []migrate.Incoming `json:"receiving"`
	Decisions []DecisionRecord   `json:"decisions"`
}

// MigrationView is a migration this gateway sends, running or recent.
type MigrationView struct {
	migrate.SendRecord
	Running bool    `json:"running"`
	Phase   string  `json:"phase,omitempty"`
	Percent float64 `json:"percent"` // of the chunks to do
}

// Dashboard takes a snapshot of the gateway for the dashboard.
func (g *Gateway) Dashboard() (*Dashboard, error) {
	st, err := g.Status()
	if err != nil {
		return nil, err
	}
	mg := g.graphOf(st, true) // the page needs this gateway's tunnels; the others, by the thousand, would be megabytes a second
	d := &Dashboard{Time: g.now(), Status: st, Graph: mg, SVG: mg.SVG(), Decisions: g.metrics.recent.newest()}
	if g.mig == nil {
		return d, nil
	}
	sends, err := g.mig.recentSends() // those just started too
	if err != nil {
		return nil, err
	}
	phases := g.mig.live(sends)
	for i, rec := range slices.Backward(sends) { // newest first
		v := MigrationView{SendRecord: rec}
		if p, ok := phases[i]; ok {
			v.Running, v.Phase = true, p
		} else if len(d.Sending) >= recentSends {
			continue
		}
		if v.Stats.Chunks > 0 {
			v.Percent = 100 * float64(v.Stats.ChunksDone) / float64(v.Stats.Chunks)
		} else if rec.State == migrate.StateDone {
			v.Percent = 100
		}
		d.Sending = append(d.Sending, v)
	}
	d.Receiving = g.mig.recv.Active()
	return d, nil
}

// login begins a session and returns its cookie's value.
func (o *operator) login() string {
	raw := make([]byte, 32)
	rand.Read(raw)
	v := hex.EncodeToString(raw)
	now := time.Now()
	o.sessMu.Lock()
	defer o.sessMu.Unlock()
	if len(o.sessions) >= maxSessions {
		var oldest [32]byte
		var at time.Time
		for k, t := range o.sessions {
			if now.Sub(t) >= sessionLifetime {
				delete(o.sessions, k)
			} else if at.IsZero() || t.Before(at) {
				oldest, at = k, t
			}
		}
		if len(o.sessions) >= maxSessions {
			delete(o.sessions, oldest)
		}
	}
	o.sessions[sha256.Sum256([]byte(v))] = now
	return v
}

// inSession reports whether v is the cookie of a session begun less than
// sessionLifetime ago. Sessions are found by the hash of the value, so
// the lookup's timing says nothing of any value held.
func (o *operator) inSession(v string) bool {
	k := sha256.Sum256([]byte(v))
	o.sessMu.Lock()
	defer o.sessMu.Unlock()
	began, ok := o.sessions[k]
	if ok && time.Since(began) >= sessionLifetime {
		delete(o.sessions, k)
		return false
	}
	return ok
}
