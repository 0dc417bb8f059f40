package mesh

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/migrate"
	"github.com/skybridge-mesh/skybridge/policy"
)

// metrics are a gateway's Prometheus metrics. Each gateway has its own
// registry, not the global one, so that many gateways can share a process
// (tests, the scale benchmark) without mixing their figures.
//
// Counters are updated where things happen; what the gateway can read
// whole at scrape time (members, tunnels, running migrations) is
// collected then, from the same Status the CLI shows, so the two never
// disagree.
type metrics struct {
	reg *prometheus.Registry

	rejections      *prometheus.CounterVec
	reconcileRuns   prometheus.Counter
	reconcileErrors prometheus.Counter
	reconcileTime   prometheus.Histogram
	migBytes        *prometheus.CounterVec
	migChunks       *prometheus.CounterVec
	migDone         *prometheus.CounterVec
	migRetries      *prometheus.CounterVec
	migDuration     *prometheus.HistogramVec
	decisions       *prometheus.CounterVec
	enrollments     *prometheus.CounterVec
	renewals        *prometheus.CounterVec
	probes          *prometheus.CounterVec
	probeAttempts   prometheus.Counter
	verdicts        *prometheus.CounterVec
	keyringRefused  *prometheus.CounterVec
	offersDenied    *prometheus.CounterVec
	receivesDropped *prometheus.CounterVec

	recent *decisionLog
	known  atomic.Pointer[map[string]bool] // the adopted policy's classes
}

func newMetrics(g *Gateway) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_verification_rejections_total",
			Help: "Gossiped identities or adverts refused, by reason (unknown_ca, expired, revoked, bad_signature, replay, conflict, ...).",
		}, []string{"reason"}),
		reconcileRuns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skybridge_reconcile_runs_total",
			Help: "Reconcile passes: topology computed (or reused) and applied to the WireGuard device.",
		}),
		reconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skybridge_reconcile_errors_total",
			Help: "Reconcile passes that failed to apply to the device.",
		}),
		reconcileTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "skybridge_reconcile_duration_seconds",
			Help:    "Time a reconcile pass takes.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10), // 100 µs .. 26 s
		}),
		migBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_bytes_total",
			Help: "Image bytes on the wire (after compression) by migrations, by role (send, receive).",
		}, []string{"role"}),
		migChunks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_chunks_total",
			Help: "Chunks sent or received with their data, by role.",
		}, []string{"role"}),
		migDone: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_chunks_done_total",
			Help: "Chunks a sender has dealt with, whichever way (sent and acknowledged, found at the receiver or in its stored version, zeros): progress even when nothing crosses the wire.",
		}, []string{"role"}),
		migRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_retries_total",
			Help: "Chunks sent again after the receiver refused them or a stream failed.",
		}, []string{"role"}),
		migDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "skybridge_migration_duration_seconds",
			Help:    "Duration of ended migrations, by role and outcome (done, denied, cancelled, failed).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 18), // 1 s .. 36 h: terabytes, resumed
		}, []string{"role", "outcome"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_policy_decisions_total",
			Help: "Residency decisions taken for migrations, by data class (_undefined: one the policy does not define), action (store, transit) and outcome (allowed, denied, audit).",
		}, []string{"class", "action", "outcome"}),
		enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_burst_enrollments_total",
			Help: "Burst gateways that presented a join token here, by outcome (enrolled, refused).",
		}, []string{"outcome"}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_certificate_renewals_served_total",
			Help: "Certificates of gateways issued offline renewed here, by possession of the current one (identity.renew_from), by outcome (renewed, refused).",
		}, []string{"outcome"}),
		probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_tunnel_probes_total",
			Help: "Probes through the tunnel, one a second to each gateway of a remote site with a choice of gateways, by outcome (answered, missed: none of its up to 3 connection attempts, 250 ms apart, answered within 0.8 s).",
		}, []string{"outcome"}),
		probeAttempts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "skybridge_tunnel_probe_attempts_total",
			Help: "Connection attempts made by the tunnel probes. More than one per probe means an attempt went unanswered for 250 ms: loss or delay on the tunnel, even where no probe was missed.",
		}),
		verdicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_gateway_verdicts_total",
			Help: "Times a gateway of a remote site with a choice of gateways was judged unreachable through its tunnel (two probes missed in a row) or reachable again (answering for 10 s; at once while no gateway of its site is proven), by verdict. Both rising: a gateway that comes and goes, and its site's routes with it.",
		}, []string{"verdict"}),
		keyringRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_gossip_keyring_steps_refused_total",
			Help: "Gossip key rotation steps (install, use, remove, clean; unknown: a kind this release does not know) sent to this gateway and not taken, by step and reason (malformed: it does not parse; unverified: not signed by a gateway of the mesh, or replayed; burst_initiator: a burst gateway's; clock_skew: dated too far from this clock; rotation_under_way: another gateway's rotation is under way; keyring_full: an install into a keyring of 4 keys; missed_step: names a key not installed here; failed: the keyring could not be changed or stored).",
		}, []string{"step", "reason"}),
		offersDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_offers_denied_total",
			Help: "Migration offers this gateway's residency policy denied, each one (its audit log records one sending gateway's 32 in a row, then one a minute, and counts the rest), by the kind of rule that denied it (deny, default_deny, requirement, max_hops) or no_policy: none in force here.",
		}, []string{"reason"}),
		receivesDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "skybridge_migration_receives_dropped_total",
			Help: "Interrupted receives forgotten with the chunks they held, by reason (too_many: their sender had more than 128 interrupted here, and the oldest went; abandoned: not offered again for a week). A resume of one sends every chunk again.",
		}, []string{"reason"}),
		recent: &decisionLog{max: maxRecentDecisions},
	}
	m.reg.MustRegister(m.rejections, m.reconcileRuns, m.reconcileErrors, m.reconcileTime,
		m.migBytes, m.migChunks, m.migDone, m.migRetries, m.migDuration, m.decisions, m.enrollments, m.renewals,
		m.probes, m.probeAttempts, m.verdicts, m.keyringRefused, m.offersDenied, m.receivesDropped, &gatewayCollector{g: g}, atRestCollector{g: g},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Every label value a rule or dashboard may select on exists from the
	// start, so that rate() and absent() see zeros rather than nothing.
	for _, r := range []certs.Reason{certs.ReasonMalformed, certs.ReasonUnknownCA, certs.ReasonExpired, certs.ReasonNotYetValid, certs.ReasonRevoked,
		certs.ReasonBadCertificate, certs.ReasonCertMismatch, certs.ReasonBadSignature, certs.ReasonAttributeMismatch, certs.ReasonUnprovenKey, certs.ReasonReplay, certs.ReasonClockSkew} {
		m.rejections.WithLabelValues(string(r))
	}
	m.rejections.WithLabelValues("conflict")
	for _, role := range []string{migrate.RoleSend, migrate.RoleReceive} {
		m.migBytes.WithLabelValues(role)
		m.migChunks.WithLabelValues(role)
		m.migDone.WithLabelValues(role)
		m.migRetries.WithLabelValues(role)
	}
	for _, o := range []string{"enrolled", "refused"} {
		m.enrollments.WithLabelValues(o)
	}
	for _, o := range []string{"renewed", "refused"} {
		m.renewals.WithLabelValues(o)
	}
	for _, o := range []string{"answered", "missed"} {
		m.probes.WithLabelValues(o)
	}
	for _, v := range []string{"unreachable", "reachable"} {
		m.verdicts.WithLabelValues(v)
	}
	for _, step := range keyringSteps {
		for _, reason := range keyringRefusals {
			m.keyringRefused.WithLabelValues(step, reason)
		}
	}
	for _, r := range migrate.DenialReasons {
		m.offersDenied.WithLabelValues(r)
	}
	for _, r := range migrate.DropReasons {
		m.receivesDropped.WithLabelValues(r)
	}
	return m
}

// keyringStepRefused counts a keyring step this gateway did not take;
// stepName and the refusal constants (rotate.go) keep both labels to
// fixed sets, whatever the step's sender wrote.
func (m *metrics) keyringStepRefused(kind, reason string) {
	m.keyringRefused.WithLabelValues(stepName(kind), reason).Inc()
}

func (m *metrics) probed(answered bool, attempts int) {
	outcome := "missed"
	if answered {
		outcome = "answered"
	}
	m.probes.WithLabelValues(outcome).Inc()
	m.probeAttempts.Add(float64(attempts))
}

func (m *metrics) judged(unreachable bool) {
	verdict := "reachable"
	if unreachable {
		verdict = "unreachable"
	}
	m.verdicts.WithLabelValues(verdict).Inc()
}

func (m *metrics) enrollment(outcome string) { m.enrollments.WithLabelValues(outcome).Inc() }

func (m *metrics) renewal(outcome string) { m.renewals.WithLabelValues(outcome).Inc() }

func (m *metrics) reconciled(took time.Duration, err error) {
	m.reconcileRuns.Inc()
	m.reconcileTime.Observe(took.Seconds())
	if err != nil {
		m.reconcileErrors.Inc()
	}
}

func (m *metrics) rejected(reason string) { m.rejections.WithLabelValues(reason).Inc() }

// classes makes the decision counters of a newly adopted policy's classes
// exist at zero, so that an alert on increase() sees the first denial.
func (m *metrics) classes(names []string) {
	known := map[string]bool{}
	for _, c := range names {
		known[c] = true
	}
	// undefinedClass counts the classes the policy does not define (Decided).
	for _, c := range append(sortedKeys(known), undefinedClass) {
		for _, a := range []policy.Action{policy.Store, policy.Transit} {
			for _, o := range []string{"allowed", "denied", "audit"} {
				m.decisions.WithLabelValues(c, string(a), o)
			}
		}
	}
	m.known.Store(&known)
}

// The migrate.Observer the gateway hands to its sender and receiver.

func (m *metrics) Decided(role, id string, req policy.Request, d policy.Decision) {
	outcome := decisionOutcome(d)
	class := req.Class
	if k := m.known.Load(); k == nil || !(*k)[class] {
		class = undefinedClass // a sender names the class: it must not mint label values
	}
	m.decisions.WithLabelValues(class, string(req.Action), outcome).Inc()
	sites := make([]string, len(req.Sites))
	for i, s := range req.Sites {
		sites[i] = s.Name
	}
	m.recent.add(DecisionRecord{
		Time: req.Time, Role: role, MigrationID: id, Class: req.Class, Action: string(req.Action), Sites: sites,
		Outcome: outcome, Rule: d.Rule.String(), Reasons: d.Reasons, Policy: d.Policy.RevisionString(),
	})
}

func (m *metrics) Moved(role string, chunks int, wireBytes int64) {
	m.migChunks.WithLabelValues(role).Add(float64(chunks))
	m.migBytes.WithLabelValues(role).Add(float64(wireBytes))
}

func (m *metrics) Done(role string, chunks int) { m.migDone.WithLabelValues(role).Add(float64(chunks)) }

func (m *metrics) Retried(role string) { m.migRetries.WithLabelValues(role).Inc() }

func (m *metrics) Ended(role, outcome string, took time.Duration) {
	m.migDuration.WithLabelValues(role, outcome).Observe(took.Seconds())
}

func (m *metrics) OfferDenied(reason string) { m.offersDenied.WithLabelValues(reason).Inc() }

func (m *metrics) ReceiveDropped(reason string) { m.receivesDropped.WithLabelValues(reason).Inc() }

func decisionOutcome(d policy.Decision) string {
	switch {
	case d.Audit:
		return "audit" // denied by the rules, allowed because the class is in audit mode
	case d.Allowed:
		return "allowed"
	}
	return "denied"
}

// DecisionRecord is one residency decision, as the dashboard lists it.
type DecisionRecord struct {
	Time        time.Time `json:"time"`
	Role        string    `json:"role"` // send or receive
	MigrationID string    `json:"migration_id"`
	Class       string    `json:"class"`
	Action      string    `json:"action"`
	Sites       []string  `json:"sites"`
	Outcome     string    `json:"outcome"`
	Rule        string    `json:"rule"`
	Reasons     []string  `json:"reasons"`
	Policy      string    `json:"policy"`
}

const maxRecentDecisions = 50

// decisionLog keeps the last decisions in memory for the dashboard; the
// signed audit log on disk is the record that lasts.
type decisionLog struct {
	mu   sync.Mutex
	max  int
	list []DecisionRecord // oldest first
}

func (l *decisionLog) add(d DecisionRecord) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.list) == l.max {
		copy(l.list, l.list[1:])
		l.list = l.list[:l.max-1]
	}
	l.list = append(l.list, d)
}

// newest returns the decisions, newest first.
func (l *decisionLog) newest() []DecisionRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]DecisionRecord, len(l.list))
	for i, d := range l.list {
		out[len(l.list)-1-i] = d
	}
	return out
}

// staleHandshake is when a tunnel that carries traffic should have
// handshaken again: WireGuard re-keys every 2 minutes while it is used
// and gives up on a handshake after 90 s more.
const staleHandshake = 180 * time.Second

var (
	descMembers = prometheus.NewDesc("skybridge_members",
		"Members this gateway knows, by site and state (verified, pending, refused, dead: declared dead, left: stopped on purpose); itself included. A gone gateway is forgotten once revoked, or a week after its certificate expired (a burst gateway's: at once). Site _unverified: members no verified certificate places.", []string{"site", "state"}, nil)
	descSiteReachable = prometheus.NewDesc("skybridge_site_reachable",
		"1 if the site has a verified live gateway and, where this gateway has tunnels into the site, one of them is not failing (sending with no handshake for 3 minutes); where it has none, a verified live gateway is enough. 0 otherwise.", []string{"site"}, nil)
	descHandshakeAge = prometheus.NewDesc("skybridge_peer_handshake_age_seconds",
		"Seconds since the last WireGuard handshake with the peer (+Inf: none yet).", []string{"peer", "peer_site"}, nil)
	descHandshakeTime = prometheus.NewDesc("skybridge_peer_last_handshake_timestamp_seconds",
		"Unix time of the last WireGuard handshake with the peer (0: none yet).", []string{"peer", "peer_site"}, nil)
	descTunnelFailing = prometheus.NewDesc("skybridge_peer_tunnel_failing",
		"1 if the tunnel to the peer fails: it sends without a handshake for over 3 minutes, or keeps alive (persistent keepalive) with none for that long, even when the host lets none of its packets out (the transmit counter then stands still); 0 otherwise. What status calls STALE.", []string{"peer", "peer_site"}, nil)
	descRoutesHeld = prometheus.NewDesc("skybridge_site_routes_held",
		"Prefixes of the site held unreachable here: the site's gateways that routed them are away, and their traffic is refused rather than sent by the host's other routes.", []string{"site"}, nil)
	descRx = prometheus.NewDesc("skybridge_peer_receive_bytes_total",
		"Bytes received from the peer through its tunnel.", []string{"peer", "peer_site"}, nil)
	descTx = prometheus.NewDesc("skybridge_peer_transmit_bytes_total",
		"Bytes sent to the peer through its tunnel.", []string{"peer", "peer_site"}, nil)
	descRunning = prometheus.NewDesc("skybridge_migrations_running",
		"Migrations in progress, by role.", []string{"role"}, nil)
	descAwaiting = prometheus.NewDesc("skybridge_migrations_awaiting_answer",
		"Migrations this gateway sends that wait for the receiver's answer to their offer: a resume's receiver first reads back what it holds, at a slow disk's pace hours for terabytes, and the sender waits that long, moving nothing.", nil, nil)
	descImages = prometheus.NewDesc("skybridge_images_stored",
		"Images this gateway stores, by data class.", []string{"class"}, nil)
	descImagesOutside = prometheus.NewDesc("skybridge_images_outside_policy",
		"Images this gateway stores that the residency policy in force no longer lets rest at its site (in audit mode too), by data class.", []string{"class"}, nil)
	descIdentityExpiry = prometheus.NewDesc("skybridge_identity_expiry_timestamp_seconds",
		"Unix time when this gateway's mesh certificate expires.", nil, nil)
	descIdentityIssued = prometheus.NewDesc("skybridge_identity_issued_timestamp_seconds",
		"Unix time from which this gateway's mesh certificate is valid (with the expiry, its lifetime: renewal starts at about two thirds of it).", nil, nil)
	descBurstGateway = prometheus.NewDesc("skybridge_burst_gateway",
		"1 if this gateway belongs to a burst site: its certificate lasts exactly the burst and is not renewed.", nil, nil)
	descIssuerAnswered = prometheus.NewDesc("skybridge_issuer_last_answer_timestamp_seconds",
		"Unix time of the last answer from this gateway's issuer (Vault, or the local CA of ca_dir) to its request for the trust bundle (every skybridge_issuer_refresh_interval_seconds), with the gateway's login (lists Vault serves to anyone while it refuses the login are read, but are no answer); 0: none since the gateway started. Gateways without an issuer do not export it.", nil, nil)
	descIssuerRefresh = prometheus.NewDesc("skybridge_issuer_refresh_interval_seconds",
		"How often this gateway asks its issuer for the trust bundle (identity.refresh). Gateways without an issuer do not export it.", nil, nil)
	descGossipPackets = prometheus.NewDesc("skybridge_gossip_packets_total",
		"Gossip datagrams (probes, gossip, small requests), by direction (sent, received).", []string{"direction"}, nil)
	descGossipBytes = prometheus.NewDesc("skybridge_gossip_bytes_total",
		"Gossip bytes as they cross the network (encrypted, without IP/UDP/TCP headers), by transport (udp: datagrams; tcp: push/pull exchanges and large messages) and direction.", []string{"transport", "direction"}, nil)
	descGossipStreamsClosed = prometheus.NewDesc("skybridge_gossip_streams_closed_total",
		"Incoming gossip TCP streams the gateway closed before reading them through, by reason (too_many: more than 256 at once; too_many_from_source: more than 32 at once from one address no member gossips from; too_much: over 64 MiB read by all at once). Before the gossip key is checked: anyone who reaches the port can cause them.", []string{"reason"}, nil)
	descInfo = prometheus.NewDesc("skybridge_gateway_info",
		"The gateway's identity and configuration (value 1).", []string{"node", "site", "region", "jurisdiction", "mode", "policy"}, nil)
)

// gatewayCollector reads the gateway's state at scrape time.
type gatewayCollector struct{ g *Gateway }

// Describe describes nothing, which makes this an unchecked collector:
// its series (one per member and peer) are only known at scrape time, and
// the gateway is not complete yet when the collector is registered.
func (c *gatewayCollector) Describe(chan<- *prometheus.Desc) {}

func (c *gatewayCollector) Collect(ch chan<- prometheus.Metric) {
	tr := &c.g.traffic
	for _, v := range []struct {
		desc   *prometheus.Desc
		n      *atomic.Int64
		labels []string
	}{
		{descGossipPackets, &tr.packetsSent, []string{"sent"}},
		{descGossipPackets, &tr.packetsReceived, []string{"received"}},
		{descGossipBytes, &tr.packetBytesSent, []string{"udp", "sent"}},
		{descGossipBytes, &tr.packetBytesReceived, []string{"udp", "received"}},
		{descGossipBytes, &tr.streamBytesSent, []string{"tcp", "sent"}},
		{descGossipBytes, &tr.streamBytesReceived, []string{"tcp", "received"}},
		{descGossipStreamsClosed, &tr.streamsTooMany, []string{"too_many"}},
		{descGossipStreamsClosed, &tr.streamsFromOne, []string{"too_many_from_source"}},
		{descGossipStreamsClosed, &tr.streamsTooMuch, []string{"too_much"}},
	} {
		ch <- prometheus.MustNewConstMetric(v.desc, prometheus.CounterValue, float64(v.n.Load()), v.labels...)
	}
	// The identity first: a status that cannot be read (the device)
	// must not also silence the certificate-expiry alert.
	cert := c.g.id.Load().Certificate()
	ch <- prometheus.MustNewConstMetric(descIdentityExpiry, prometheus.GaugeValue, float64(cert.NotAfter.Unix()))
	ch <- prometheus.MustNewConstMetric(descIdentityIssued, prometheus.GaugeValue, float64(cert.NotBefore.Unix()))
	ch <- prometheus.MustNewConstMetric(descBurstGateway, prometheus.GaugeValue, b2f(c.g.burst != nil))
	if c.g.prov.Issuer() != nil {
		ch <- prometheus.MustNewConstMetric(descIssuerAnswered, prometheus.GaugeValue, float64(c.g.issuerAnswered.Load()))
		ch <- prometheus.MustNewConstMetric(descIssuerRefresh, prometheus.GaugeValue, c.g.prov.Refresh().Seconds())
	}
	// The migrations too: the stalled-migration alert reads them when
	// the device cannot be.
	send, awaiting, recv := c.g.migrationsRunning()
	ch <- prometheus.MustNewConstMetric(descRunning, prometheus.GaugeValue, float64(send), migrate.RoleSend)
	ch <- prometheus.MustNewConstMetric(descAwaiting, prometheus.GaugeValue, float64(awaiting))
	ch <- prometheus.MustNewConstMetric(descRunning, prometheus.GaugeValue, float64(recv), migrate.RoleReceive)
	st, err := c.g.Status()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descMembers, err) // logged by the handler
		return
	}
	now := c.g.now()
	ch <- prometheus.MustNewConstMetric(descInfo, prometheus.GaugeValue, 1, st.Node, st.Site, st.Region, st.Jurisdiction, st.Mode, st.Policy)
	for _, s := range siteHealth(st, now) {
		for _, state := range []MemberState{StateVerified, StatePending, StateRefused, StateDead, stateLeft} {
			ch <- prometheus.MustNewConstMetric(descMembers, prometheus.GaugeValue, float64(s.count[state]), s.name, string(state))
		}
		if s.name != unknownSite { // not a site: members no certificate places
			ch <- prometheus.MustNewConstMetric(descSiteReachable, prometheus.GaugeValue, b2f(s.reachable), s.name)
		}
	}
	for _, m := range st.Members {
		if !m.Peer {
			continue
		}
		age, at := math.Inf(1), 0.0
		if !m.LastHandshake.IsZero() {
			age, at = now.Sub(m.LastHandshake).Seconds(), float64(m.LastHandshake.UnixNano())/1e9
		}
		ch <- prometheus.MustNewConstMetric(descHandshakeAge, prometheus.GaugeValue, age, m.Node, m.Site)
		ch <- prometheus.MustNewConstMetric(descHandshakeTime, prometheus.GaugeValue, at, m.Node, m.Site)
		ch <- prometheus.MustNewConstMetric(descTunnelFailing, prometheus.GaugeValue, b2f(m.Health == TunnelStale), m.Node, m.Site)
		ch <- prometheus.MustNewConstMetric(descRx, prometheus.CounterValue, float64(m.RxBytes), m.Node, m.Site)
		ch <- prometheus.MustNewConstMetric(descTx, prometheus.CounterValue, float64(m.TxBytes), m.Node, m.Site)
	}
	for _, site := range sortedKeys(st.Held) {
		ch <- prometheus.MustNewConstMetric(descRoutesHeld, prometheus.GaugeValue, float64(len(st.Held[site])), site)
	}
}

// atRestCollector exports the stored images as the residency loop last
// judged them: the catalog is not read per scrape.
type atRestCollector struct{ g *Gateway }

func (c atRestCollector) Describe(chan<- *prometheus.Desc) {}

func (c atRestCollector) Collect(ch chan<- prometheus.Metric) {
	if c.g.mig == nil {
		return
	}
	stored, outside := c.g.mig.atRest.counts()
	for _, class := range sortedKeys(stored) {
		ch <- prometheus.MustNewConstMetric(descImages, prometheus.GaugeValue, float64(stored[class]), class)
		ch <- prometheus.MustNewConstMetric(descImagesOutside, prometheus.GaugeValue, float64(outside[class]), class)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unknownSite counts the members no verified certificate places in a site
// (pending, refused, never verified): it has no reachability, or an
// impostor knocking once, or a member gone before its certificate came,
// would page as a site down. undefinedClass counts the decisions on
// classes the policy does not define. Both begin with '_', which no site
// (certs.ValidName) nor class (the policy's names) may: "unknown" is a
// name either may carry, and a site of that name was merged with the
// strangers, with no reachability of its own.
const (
	unknownSite    = "_unverified"
	undefinedClass = "_undefined"
)

type siteState struct {
	name      string
	count     map[MemberState]int
	reachable bool
}

// stateLeft counts, in skybridge_members, the gateways stopped on purpose
// (a member's state is dead; its notice says it left).
const stateLeft MemberState = "left"

// siteHealth groups the members by site. A site is reachable when a
// gateway of it is verified and alive (ours always is) and no tunnel into
// it is failing: one that has sent traffic with no handshake for longer
// than WireGuard allows. An idle tunnel never handshakes, so idleness
// alone says nothing. A gateway that left on purpose counts as left, and
// its site, with no other gateway alive, as unreachable: stopping a
// site's only gateway (systemctl stop, an upgrade) cuts the site off as a
// crash does. A retired gateway goes from the membership, and so from
// here, once its certificate is revoked or expires. Members never
// verified count under unknownSite.
func siteHealth(st *Status, now time.Time) []siteState {
	by := map[string]*siteState{}
	get := func(name string) *siteState {
		if by[name] == nil {
			by[name] = &siteState{name: name, count: map[MemberState]int{}}
		}
		return by[name]
	}
	self := get(st.Site)
	self.count[StateVerified]++
	self.reachable = true
	healthy := map[string]bool{}
	gossipOnly := map[string]bool{} // a verified gateway of the site, no tunnel to it from here
	tunnels := map[string]bool{}    // the site has a tunnel from here
	for _, m := range st.Members {
		site := m.Site
		if !m.SiteVerified {
			// Only a certificate names a site: a refused or pending
			// member's claim must not create (or hide) one.
			site = unknownSite
		}
		s := get(site)
		if m.Left {
			s.count[stateLeft]++
		} else {
			s.count[m.State]++
		}
		if m.State != StateVerified || site == st.Site {
			continue
		}
		if !m.Peer {
			gossipOnly[site] = true
			continue
		}
		tunnels[site] = true
		if tunnelHealth(m, now) != TunnelStale {
			healthy[site] = true
		}
	}
	out := make([]siteState, 0, len(by))
	for _, name := range sortedKeys(by) {
		s := by[name]
		if name != st.Site {
			// Through its tunnels from here where it has any (a hub's
			// sibling, no peer of ours, is reached through the hub, not
			// otherwise); without any (behind our hub, or kept from us
			// by the policy), gossip is the signal.
			s.reachable = healthy[name] || !tunnels[name] && gossipOnly[name]
		}
		out = append(out, *s)
	}
	return out
}

// rejectionReason names a refusal for the rejections metric: a
// certificate verification reason, or what the membership itself refused.
func rejectionReason(err error) string {
	if r := certs.ReasonOf(err); r != "" {
		return string(r)
	}
	if _, ok := err.(*conflictError); ok {
		return "conflict"
	}
	return string(certs.ReasonMalformed)
}
