package certs

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Files of an embedded CA directory and of a node identity directory.
const (
	fileCACert   = "ca.crt"
	fileCAKey    = "ca.key"
	fileCRL      = "crl.pem"
	fileIndex    = "issued.json"
	fileArchive  = "issued-archive.jsonl" // index entries long ended
	fileLock     = ".lock"
	fileNodeCert = "node.crt"
	fileNodeKey  = "node.key"
	// fileNodeKeyPrev is the node key being replaced, until its new
	// certificate is written.
	fileNodeKeyPrev = "node.key.prev"
)

// Defaults of the embedded CA.
const (
	DefaultCAValidity = 10 * 365 * 24 * time.Hour
	DefaultNodeTTL    = 30 * 24 * time.Hour
	// crlValidity is the nextUpdate horizon written into revocation lists.
	// Gateways keep enforcing the newest list they have after it passes
	// (revocations only accumulate), so this is advisory for other tools.
	crlValidity = 30 * 24 * time.Hour
	// backdate absorbs clock skew between the CA and the gateways.
	backdate = time.Minute
)

// DefaultMeshPrefix is the overlay range of a new mesh unless told
// otherwise: a /16 out of the RFC 6598 shared space, which enterprise
// networks rarely route.
var DefaultMeshPrefix = netip.MustParsePrefix("100.96.0.0/16")

// CA is the embedded, file-backed mesh certificate authority. Its key is
// ECDSA P-256: the curve is approved under FIPS 186-5 and FIPS 140-3
// validated modules (including Go's own crypto/fips140 module), every HSM and
// Vault's PKI engine support it, and bank PKI teams accept it without debate;
// Ed25519 is approved too but still missing from many HSMs and audit
// checklists. The CA never prints or logs its private key.
//
// Operations that change the CA (Issue, RevokeSerials) take an exclusive lock on
// the directory, so two operators running `skybridge ca` at once cannot lose
// an entry of the index or a revocation.
type CA struct {
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// InitOptions configure a new CA.
type InitOptions struct {
	Name       string        // shown in the CA subject; defaults to "skybridge mesh"
	MeshPrefix netip.Prefix  // overlay range; DefaultMeshPrefix if zero
	Validity   time.Duration // DefaultCAValidity if zero
	Now        time.Time     // time.Now() if zero
}

// InitCA creates a CA in dir, which must not exist or be empty. The CA's
// files are written into a temporary directory and renamed into place (or,
// into a directory that is there, moved in, ca.key last: see initIn), so a
// crash leaves either no CA or a complete one.
func InitCA(dir string, opt InitOptions) (*CA, error) {
	if opt.Name == "" {
		opt.Name = "skybridge mesh"
	}
	if !opt.MeshPrefix.IsValid() {
		opt.MeshPrefix = DefaultMeshPrefix
	}
	if opt.MeshPrefix != opt.MeshPrefix.Masked() {
		return nil, fmt.Errorf("mesh range %s has host bits set: did you mean %s?", opt.MeshPrefix, opt.MeshPrefix.Masked())
	}
	switch {
	case opt.Validity == 0:
		opt.Validity = DefaultCAValidity
	case opt.Validity < 0:
		return nil, fmt.Errorf("CA validity %s is negative", opt.Validity)
	}
	if opt.Now.IsZero() {
		opt.Now = time.Now()
	}
	if err := checkEmptyDir(dir); err != nil {
		return nil, err
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	mask := net.CIDRMask(opt.MeshPrefix.Bits(), opt.MeshPrefix.Addr().BitLen())
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: opt.Name + " CA", Organization: []string{"skybridge"}},
		NotBefore:             opt.Now.Add(-backdate),
		NotAfter:              opt.Now.Add(opt.Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		// The name constraint makes every standard X.509 verifier, not only
		// ours, refuse a node certificate whose overlay IP lies outside the
		// mesh range.
		PermittedDNSDomainsCritical: true,
		PermittedIPRanges:           []*net.IPNet{{IP: opt.MeshPrefix.Addr().AsSlice(), Mask: mask}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &CA{cert: cert, key: key}

	if st, err := os.Stat(dir); err == nil {
		// An empty directory that is there already, perhaps a mount
		// point or ".", which rename(2) will not replace: the CA was
		// written on its parent's filesystem, and then not moved.
		if err := ca.initIn(dir, st, opt); err != nil {
			return nil, err
		}
		return ca, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("check CA directory: %w", err)
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", parent, err)
	}
	// What an init that crashed left (a CA key that never became a CA)
	// goes; one younger than an hour may be another init still running.
	if old, _ := filepath.Glob(filepath.Join(parent, "."+filepath.Base(dir)+".init-*")); len(old) > 0 {
		for _, o := range old {
			if fi, err := os.Lstat(o); err == nil && fi.IsDir() && time.Since(fi.ModTime()) > time.Hour {
				os.RemoveAll(o)
			}
		}
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".init-*")
	if err != nil {
		return nil, fmt.Errorf("create CA directory: %w", err)
	}
	defer os.RemoveAll(tmp) // no-op once renamed
	if err := ca.writeNew(tmp, opt); err != nil {
		return nil, err
	}
	if err := os.Chmod(tmp, 0o700); err != nil {
		return nil, err
	}
	// rename(2) replaces an empty directory atomically and fails on a
	// non-empty one (made meanwhile, another init's made in it), so a
	// concurrent init cannot clobber a CA either. (os.Rename refuses any
	// existing directory, hence the raw call.)
	if err := syscall.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("move new CA into %s: %w (is a CA already there?)", dir, err)
	}
	if err := atomicfile.SyncDir(parent); err != nil {
		return nil, err
	}
	ca.dir = dir
	return ca, nil
}

// writeNew writes the files of the new CA into dir.
func (ca *CA) writeNew(dir string, opt InitOptions) error {
	ca.dir = dir
	keyPEM, err := marshalKeyPEM(ca.key)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteNew(filepath.Join(dir, fileCAKey), keyPEM, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteNew(filepath.Join(dir, fileCACert), encodePEM(pemCert, ca.cert.Raw), 0o644); err != nil {
		return err
	}
	// The mesh's first gossip keyring is born with its CA; `ca issue`
	// hands it out with every identity.
	kr, err := GenerateGossipKeyring()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteNew(filepath.Join(dir, FileGossipKeyring), kr.MarshalSecret(), 0o600); err != nil {
		return err
	}
	idx := &caIndex{MeshPrefix: opt.MeshPrefix.String()}
	if err := ca.writeCRL(idx, opt.Now); err != nil {
		return err
	}
	return ca.writeIndex(idx)
}

// initPrefix begins the name of the directory an init of a directory
// that is there already writes the CA in, inside it.
const initPrefix = ".init-"

// initMoves are the files of a new CA in the order an init moves them
// into a directory that was there: ca.key last, so that a CA is there
// once it is, whole, and an init cut short before it left no CA but files
// the next init clears (checkEmptyDir).
var initMoves = []string{FileGossipKeyring, fileIndex, fileCRL, fileCACert, fileCAKey}

// initIn writes the CA into dir, an empty directory that is there
// already, under the CA's lock, so that of two inits the second finds
// the first's CA: into a directory of its own inside dir, on dir's
// filesystem, then moved into dir (initMoves).
func (ca *CA) initIn(dir string, st os.FileInfo, opt InitOptions) error {
	// What OpenCA would refuse the directory for is refused before the
	// key is written.
	if err := keyDir(dir, st); err != nil {
		return err
	}
	if st.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("make the CA directory %s private (mode 0700): %w; give a directory of your own", dir, err)
		}
	}
	unlock, err := lockFile(filepath.Join(dir, fileLock))
	if err != nil {
		return fmt.Errorf("create the CA in %s: %w", dir, err)
	}
	defer unlock()
	// Another init may have made its CA meanwhile; and what is there
	// besides the lock, an init cut short left (checkEmptyDir): under the
	// lock, none is running.
	if err := checkEmptyDir(dir); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("check CA directory: %w", err)
	}
	for _, e := range ents {
		if e.Name() != fileLock && e.Name() != "lost+found" {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("remove what an init cut short left in %s: %w", dir, err)
			}
		}
	}
	tmp, err := os.MkdirTemp(dir, initPrefix+"*")
	if err != nil {
		return fmt.Errorf("create the CA in %s: %w", dir, err)
	}
	defer os.RemoveAll(tmp)
	if err := ca.writeNew(tmp, opt); err != nil {
		return err
	}
	for i, name := range initMoves {
		if err := os.Rename(filepath.Join(tmp, name), filepath.Join(dir, name)); err != nil {
			// Taken back, or the next init would find them with no
			// key, nor anything to say an init left them.
			for _, moved := range initMoves[:i] {
				os.Remove(filepath.Join(dir, moved))
			}
			return fmt.Errorf("move the new CA's %s into %s: %w", name, dir, err)
		}
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return err
	}
	ca.dir = dir
	return nil
}

// emptyDir says whether dir is a directory with nothing in it.
func emptyDir(dir string) bool {
	ents, err := os.ReadDir(dir)
	return err == nil && len(ents) == 0
}

func checkEmptyDir(dir string) error {
	ents, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("check CA directory: %w", err)
	}
	// Besides what an init of the directory (initIn) left, or makes
	// now: its lock, its own directory and, cut short as it moved the CA
	// in (or still moving it), the files it moved before ca.key.
	names := map[string]bool{}
	initLeft, moved := false, true
	for _, e := range ents {
		switch {
		case e.Name() == fileLock:
		case e.Name() == "lost+found" && e.IsDir() && emptyDir(filepath.Join(dir, e.Name())):
			// What mkfs puts at the root of an ext file system: a
			// mount point of its own for the CA has one.
		case e.IsDir() && strings.HasPrefix(e.Name(), initPrefix):
			initLeft = true
		default:
			names[e.Name()] = true
			moved = moved && slices.Contains(initMoves, e.Name())
		}
	}
	switch {
	case names[fileCAKey]:
		return fmt.Errorf("a CA already exists in %s; refusing to overwrite it (choose another --dir, or remove it yourself if you really mean to replace the mesh's trust root)", dir)
	case initLeft && moved:
		return nil
	case names[fileCACert]:
		// Every gateway's identity directory holds the CA's certificate.
		return fmt.Errorf("%s holds a CA certificate but no CA key: a gateway's identity directory, or a copy of the CA's certificate, not a CA; give a new or empty directory for the CA", dir)
	}
	if len(names) > 0 {
		return fmt.Errorf("%s is not empty; give a new or empty directory for the CA", dir)
	}
	return nil
}

// OpenCA loads the CA in dir.
func OpenCA(dir string) (*CA, error) {
	if st, err := os.Stat(dir); err == nil && !st.IsDir() {
		return nil, fmt.Errorf("%s is a file: give the CA's directory, the one `skybridge ca init --dir` made (it holds %s and %s)", dir, fileCACert, fileCAKey)
	}
	cert, key, err := loadKeyPair(dir, fileCACert, fileCAKey)
	if errors.Is(err, os.ErrNotExist) {
		if _, kerr := os.Stat(filepath.Join(dir, fileCAKey)); kerr == nil {
			// The key without its certificate is a damaged CA, not an
			// absent one: `ca init` would refuse the directory anyway.
			return nil, fmt.Errorf("the CA in %s has its key but not its certificate %s: restore %s from a backup (any gateway's identity directory holds a copy)", dir, fileCACert, fileCACert)
		}
		return nil, fmt.Errorf("no CA in %s: create one with `skybridge ca init --dir %s`", dir, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("CA in %s: %w", dir, err)
	}
	// ca.crt is held here to what TrustBundle holds it to: the commands
	// read the bundle after they issued or revoked, and a refusal then
	// left a certificate nobody held, or a revocation reported as failed.
	if _, err := readCACert(dir); err != nil {
		return nil, fmt.Errorf("CA in %s: %w", dir, err)
	}
	return &CA{dir: dir, cert: cert, key: key}, nil
}

// Certificate returns the CA certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Signer returns the CA key as a crypto.Signer, for signing what the whole
// mesh must trust (the residency policy). The signer prints as [redacted].
func (ca *CA) Signer() crypto.Signer { return signer{k: ca.key} }

// Dir is the CA's directory.
func (ca *CA) Dir() string { return ca.dir }

// MeshPrefix is the overlay range the CA's name constraint permits.
func (ca *CA) MeshPrefix() netip.Prefix { return meshPrefixOf(ca.cert) }

func (ca *CA) String() string {
	return fmt.Sprintf("CA %q (%s)", ca.cert.Subject.CommonName, ca.MeshPrefix())
}

// Format prints the CA's public identity only.
func (ca *CA) Format(f fmt.State, _ rune) { fmt.Fprint(f, ca.String()) }

// LogValue logs the CA's public identity only.
func (ca *CA) LogValue() slog.Value {
	return slog.GroupValue(slog.String("ca", ca.cert.Subject.CommonName), slog.String("mesh", ca.MeshPrefix().String()))
}

// TrustBundle returns the CA certificate and current revocation list as a
// bundle for verifiers.
func (ca *CA) TrustBundle() (*TrustBundle, error) {
	tb, err := LoadTrustBundle(ca.dir, netip.Prefix{})
	if err != nil {
		return nil, err
	}
	// Every list a CA hands out is its own: without one (crl.pem
	// removed, or another CA's copied over it) its revocations would
	// reach nobody.
	if tb.CRL() == nil {
		why := "is missing or another CA's"
		if len(tb.BehindCRLs()) > 0 {
			// A delta an earlier release took from gossip and wrote
			// back (TakeNewerCRL), loaded behind no list.
			why = "holds a delta list, of what was revoked since a complete one, and no complete list"
		}
		return nil, fmt.Errorf("the CA directory %s holds no revocation list of this CA (%s %s): restore it from a backup, or sign a new one from the CA's index with `skybridge ca crl --refresh --ca %s`", ca.dir, fileCRL, why, ca.dir)
	}
	return tb, nil
}

// Secrets returns the CA directory's secret store, which holds the mesh's
// gossip keyring.
func (ca *CA) Secrets() DirSecrets { return DirSecrets{Dir: ca.dir} }

// CopyGossipKeyring gives a new gateway directory the mesh's gossip keyring,
// unless it already has one (which may be newer, after a rotation) and
// holds no certificate of another CA's: a directory re-issued after a new
// `ca init` would otherwise keep the old mesh's keyring, and its gateway
// could read none of this mesh's gossip.
func (ca *CA) CopyGossipKeyring(ctx context.Context, dir string) error {
	kr, err := ca.Secrets().GossipKeyring(ctx)
	if err != nil {
		return err
	}
	if err := MkdirPrivate(dir); err != nil {
		return err
	}
	write := atomicfile.WriteNew
	if c := certificateIn(dir, fileNodeCert); c != nil && c.CheckSignatureFrom(ca.cert) != nil {
		write = atomicfile.WriteFile
	}
	err = write(filepath.Join(dir, FileGossipKeyring), kr.MarshalSecret(), 0o600)
	if err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return nil
}

// IssueRequest asks the CA for a gateway certificate.
type IssueRequest struct {
	Attributes Attributes
	PublicKey  crypto.PublicKey // the gateway's key; ECDSA P-256
	TTL        time.Duration    // DefaultNodeTTL if zero
	Now        time.Time        // time.Now() if zero
}

// Issue signs a gateway certificate binding req.Attributes to req.PublicKey
// and records it in the CA's index.
func (ca *CA) Issue(req IssueRequest) (*x509.Certificate, error) {
	return ca.issueGateway(req, "", nil)
}

// issueGateway is Issue of a renewal of the certificate renewedFrom (if
// set), with a further check of the index, if any, under its lock, which
// may refuse, or answer with a certificate issued already for the same
// request (see issuance).
func (ca *CA) issueGateway(req IssueRequest, renewedFrom string, check func(*caIndex) (*x509.Certificate, error)) (*x509.Certificate, error) {
	is, err := ca.gatewayIssuance(req, renewedFrom, check)
	if err != nil {
		return nil, err
	}
	return ca.issue(is)
}

// IssueMany is Issue of several gateway certificates under one hold of
// the CA's lock and one write of its index. The index is read and written
// whole, with an fsync, at every issue: a burst's gateways enrolling
// together, each issued on its own, cost one write of an index that grows
// with each, and 2,000 of them took minutes. Each request is judged as
// Issue judges it, against the index with those before it in reqs
// issued; one refused or failed (its error in errs, its certificate nil)
// leaves the others. err, the index not written, fails them all.
func (ca *CA) IssueMany(reqs []IssueRequest) (issued []*x509.Certificate, errs []error, err error) {
	issued, errs = make([]*x509.Certificate, len(reqs)), make([]error, len(reqs))
	iss := make([]*issuance, len(reqs))
	var now time.Time
	for i, req := range reqs {
		if iss[i], errs[i] = ca.gatewayIssuance(req, "", nil); errs[i] == nil && iss[i].now.After(now) {
			now = iss[i].now
		}
	}
	if now.IsZero() { // every one refused: nothing to take the lock for
		return issued, errs, nil
	}
	err = ca.updateIndex(now, func(idx *caIndex) error {
		changed := false
		for i, is := range iss {
			if is == nil {
				continue
			}
			issued[i], errs[i] = ca.sign(is, idx)
			changed = changed || errs[i] == nil
		}
		if !changed {
			return errUnchanged
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return issued, errs, nil
}

// gatewayIssuance is what issueGateway issues, checked as far as it can
// be without the index.
func (ca *CA) gatewayIssuance(req IssueRequest, renewedFrom string, check func(*caIndex) (*x509.Certificate, error)) (*issuance, error) {
	if req.Now.IsZero() {
		req.Now = time.Now()
	}
	attrs := req.Attributes
	attrs.Normalize()
	if err := attrs.Validate(ca.MeshPrefix()); err != nil {
		return nil, refusal{err}
	}
	tmpl := &x509.Certificate{
		Subject: pkix.Name{
			CommonName:         attrs.Node,
			OrganizationalUnit: []string{attrs.Site},
			Organization:       []string{"skybridge"},
			Country:            []string{attrs.Jurisdiction},
		},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{attrs.URI()},
		IPAddresses: []net.IP{attrs.OverlayIP.AsSlice()},
	}
	entry := IssuedCert{Kind: KindGateway, Node: attrs.Node, Site: attrs.Site, OverlayIP: attrs.OverlayIP.String(), RenewedFrom: renewedFrom}
	for _, r := range attrs.Routes {
		entry.Routes = append(entry.Routes, r.String())
	}
	return ca.prepare(tmpl, req.PublicKey, req.TTL, req.Now, entry, func(idx *caIndex) (*x509.Certificate, error) {
		if check != nil {
			if c, err := check(idx); c != nil || err != nil {
				return c, err
			}
		}
		kept := false // the node had this address already: a renewal, by whatever way
		for _, e := range idx.Certs {
			if e.OverlayIP == entry.OverlayIP && e.Node != attrs.Node && e.RevokedAt == nil && e.NotAfter.After(req.Now) {
				return nil, fmt.Errorf("overlay IP %s is already held by node %q (serial %s, valid until %s): pick another address or revoke that certificate first",
					attrs.OverlayIP, e.Node, e.Serial, e.NotAfter.UTC().Format(time.RFC3339))
			}
			kept = kept || e.OverlayIP == entry.OverlayIP && e.Node == attrs.Node && (e.Kind == KindGateway || e.Kind == "")
		}
		if err := rangeEnd(attrs.OverlayIP, ca.MeshPrefix()); err != nil && !kept && renewedFrom == "" {
			return nil, refusal{err}
		}
		return nil, routesFree(idx, attrs, req.Now)
	})
}

// routesFree refuses routes that overlap those of another site's gateway.
// The mesh settles such a conflict by certificate age (mesh's membership),
// and every renewal makes a certificate the youngest: a CA that certified
// both would hand a site's prefixes to the other at the first renewal.
// Only each gateway's latest certificate counts, so that a site's
// gateways re-issued without a prefix free it for another site here (the
// mesh moves it once they run the new certificates).
// Entries written before the index kept routes are not checked.
func routesFree(idx *caIndex, attrs Attributes, now time.Time) error {
	if len(attrs.Routes) == 0 {
		return nil
	}
	latest := map[string]IssuedCert{}
	for _, e := range idx.Certs {
		if e.Kind != KindGateway && e.Kind != "" || e.Node == attrs.Node || e.RevokedAt != nil || !e.NotAfter.After(now) {
			continue
		}
		// Later in the index is later issued, as Renew takes it, whatever
		// the CA's clock said: stepped back between two issues, a later
		// one has the earlier NotBefore.
		latest[e.Node] = e
	}
	for _, n := range slices.Sorted(maps.Keys(latest)) {
		e := latest[n]
		if e.Site == attrs.Site {
			continue // a site's gateways share its routes
		}
		for _, s := range e.Routes {
			held, err := netip.ParsePrefix(s)
			if err != nil {
				continue
			}
			for _, r := range attrs.Routes {
				if r.Overlaps(held) {
					return fmt.Errorf("route %s overlaps %s of site %s (node %q, serial %s, valid until %s): routes of two sites must not overlap; re-issue that site's gateways without it first (the mesh moves it once they run the new certificates), or revoke their certificates",
						r, held, e.Site, e.Node, e.Serial, e.NotAfter.UTC().Format(time.RFC3339))
				}
			}
		}
	}
	return nil
}

// Kinds of certificates the CA issues.
const (
	KindGateway      = "gateway"
	KindPolicySigner = "policy-signer"
	KindEnroller     = "enroller"
)

// enrollerUnit is the organizational unit of enrollment endpoints'
// certificates.
const enrollerUnit = "enrollment endpoints"

// IssueEnroller certifies pub for the enrollment endpoint of the gateway
// called node: what a newcomer checks against its join token (the CA pin,
// the gateway's name), and nothing more. The endpoint answers strangers,
// and the gateway's own certificate would tell them its site,
// jurisdiction, routes and labels. Server authentication only: the mesh,
// which asks for client authentication, never takes it for a gateway.
func (ca *CA) IssueEnroller(node string, overlayIP netip.Addr, pub crypto.PublicKey, ttl time.Duration, now time.Time) (*x509.Certificate, error) {
	if !nameRE.MatchString(node) {
		return nil, fmt.Errorf("node name %q is not valid", node)
	}
	// Its URI needs a host for the CA's name constraints to judge: not
	// the gateway's site, which it would tell.
	a := Attributes{Node: node, Site: "enrollment-endpoint"}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: node, Organization: []string{"skybridge"}, OrganizationalUnit: []string{enrollerUnit}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		URIs:        []*url.URL{a.URI()}, // a newcomer of an earlier release reads the name there
		IPAddresses: []net.IP{overlayIP.AsSlice()},
	}
	return ca.issueNew(tmpl, pub, ttl, now, IssuedCert{Kind: KindEnroller, Node: node})
}

// IssuePolicySigner certifies pub as a policy signer called name: a
// code-signing certificate without mesh attributes, so the compliance team
// can sign residency policies without holding the CA key, and lose that
// right by revocation.
func (ca *CA) IssuePolicySigner(name string, pub crypto.PublicKey, ttl time.Duration, now time.Time) (*x509.Certificate, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("signer name %q is not valid: use 1-63 lower-case letters, digits and '-'", name)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, Organization: []string{"skybridge"}, OrganizationalUnit: []string{"policy signers"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning},
	}
	return ca.issueNew(tmpl, pub, ttl, now, IssuedCert{Kind: KindPolicySigner, Node: name})
}

// ErrIssueRefused is what errors.Is finds in the CA's refusal to issue a
// certificate as asked (its attributes, key or life, an address or route
// another holds), as opposed to a failure to (its index unwritable):
// asking again the same will not do.
var ErrIssueRefused = errors.New("the CA refuses to issue the certificate as asked")

// refusal is an error ErrIssueRefused finds, its message its own.
type refusal struct{ error }

func (r refusal) Is(target error) bool { return target == ErrIssueRefused }
func (r refusal) Unwrap() error        { return r.error }

// issuance is a certificate to issue: tmpl for pub, recorded as entry;
// check, if set, may refuse under the index lock, or return a
// certificate issued already for the same request (a renewal asked
// again), which is then the answer: nothing is issued, nor the index
// written.
type issuance struct {
	tmpl  *x509.Certificate
	pub   crypto.PublicKey
	now   time.Time
	entry IssuedCert
	check func(*caIndex) (*x509.Certificate, error)
}

// issueNew signs tmpl for pub, valid from now for ttl, and records entry
// in the index.
func (ca *CA) issueNew(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration, now time.Time, entry IssuedCert) (*x509.Certificate, error) {
	is, err := ca.prepare(tmpl, pub, ttl, now, entry, nil)
	if err != nil {
		return nil, err
	}
	return ca.issue(is)
}

// prepare checks what can be checked of an issuance without the index:
// tmpl for pub, valid from now for ttl.
func (ca *CA) prepare(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration, now time.Time, entry IssuedCert, check func(*caIndex) (*x509.Certificate, error)) (*issuance, error) {
	if ttl == 0 {
		ttl = DefaultNodeTTL
	}
	if ttl < 0 {
		return nil, refusal{fmt.Errorf("TTL %s is negative", ttl)}
	}
	if err := CheckNodeKey(pub); err != nil {
		return nil, refusal{err}
	}
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		return nil, refusal{fmt.Errorf("TTL %s would outlive the CA (valid until %s): choose a shorter --ttl", ttl, ca.cert.NotAfter.UTC().Format(time.RFC3339))}
	}
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-backdate), notAfter
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid = true
	return &issuance{tmpl: tmpl, pub: pub, now: now, entry: entry, check: check}, nil
}

// issue issues is under the CA's lock and records it in the index.
func (ca *CA) issue(is *issuance) (*x509.Certificate, error) {
	var cert *x509.Certificate
	err := ca.updateIndex(is.now, func(idx *caIndex) error {
		c, err := ca.sign(is, idx)
		cert = c
		return err
	})
	if err != nil {
		return nil, err
	}
	return cert, nil
}

// sign signs is and adds it to idx, under the CA's lock; idx is left as
// it was if it fails. The certificate its check answered with comes with
// errUnchanged.
func (ca *CA) sign(is *issuance, idx *caIndex) (*x509.Certificate, error) {
	if is.check != nil {
		c, err := is.check(idx)
		if err != nil {
			return nil, refusal{err}
		}
		if c != nil {
			return c, errUnchanged
		}
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := is.tmpl
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, is.pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	entry := is.entry
	entry.Serial, entry.NotBefore, entry.NotAfter, entry.Key = FormatSerial(serial), cert.NotBefore, cert.NotAfter, keyID(cert.RawSubjectPublicKeyInfo)
	idx.add(entry)
	if entry.Kind == KindGateway {
		idx.keepRenewal(entry, der)
	}
	return cert, nil
}

// keepRenewal keeps the certificate of a renewal (CA.Renew) while it is
// its gateway's latest: a renewal whose answer was lost is asked again,
// and answered with it rather than with one more certificate. Any later
// certificate of the gateway makes the earlier one's answer of no use (a
// renewal asked again is refused then), so one is kept per gateway.
func (idx *caIndex) keepRenewal(e IssuedCert, der []byte) {
	for _, c := range idx.Certs {
		if c.Node == e.Node {
			delete(idx.Renewals, c.Serial)
		}
	}
	if e.RenewedFrom == "" {
		return
	}
	if idx.Renewals == nil {
		idx.Renewals = map[string][]byte{}
	}
	idx.Renewals[e.Serial] = der
}

// renewal returns the kept certificate of the renewal e, nil if none is
// kept (issued by a release that did not keep them) or it is not e's.
func (idx *caIndex) renewal(e IssuedCert) *x509.Certificate {
	der, ok := idx.Renewals[e.Serial]
	if !ok {
		return nil
	}
	c, err := x509.ParseCertificate(der)
	if err != nil || FormatSerial(c.SerialNumber) != e.Serial || keyID(c.RawSubjectPublicKeyInfo) != e.Key {
		return nil
	}
	return c
}

// CheckNodeKey refuses a key of a kind no skybridge identity has: before
// a request's signature is checked, so that a key of any size (an RSA
// modulus of 100,000 bits costs seconds to verify) costs nothing.
func CheckNodeKey(pub crypto.PublicKey) error {
	k, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return fmt.Errorf("gateway key is %T; skybridge identities use ECDSA P-256 keys", pub)
	}
	if k.Curve != elliptic.P256() {
		return fmt.Errorf("gateway key uses curve %s; skybridge identities use P-256", k.Curve.Params().Name)
	}
	return nil
}

// IssuedCert describes one certificate in the CA's index.
type IssuedCert struct {
	Kind      string     `json:"kind,omitempty"` // KindGateway (also when empty), KindPolicySigner or KindEnroller
	Serial    string     `json:"serial"`
	Node      string     `json:"node"`
	Site      string     `json:"site"`
	OverlayIP string     `json:"overlay_ip,omitempty"`
	Routes    []string   `json:"routes,omitempty"`
	NotBefore time.Time  `json:"not_before"`
	NotAfter  time.Time  `json:"not_after"`
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	Reason    string     `json:"revocation_reason,omitempty"`
	// Key is the SHA-256 of the certified key's SubjectPublicKeyInfo, hex.
	Key string `json:"key,omitempty"`
	// RenewedFrom is the serial of the certificate whose holder had this
	// one issued by renewal (CA.Renew): revoking that one for
	// keyCompromise revokes this too.
	RenewedFrom string `json:"renewed_from,omitempty"`
	// TakenBack: issued, but never delivered (CA.TakeBack).
	TakenBack bool `json:"taken_back,omitempty"`
	// AlreadyRevoked marks, in what a revocation returns, a certificate
	// it found revoked already and left as it was; never so in the index.
	AlreadyRevoked bool `json:"already_revoked,omitempty"`
	// Seq numbers the entries in the order they entered the index, from
	// 1 (0 in those of earlier releases). An entry the archive gives back
	// goes back to its place by it (putBack): a node's last entry is its
	// latest certificate (Renew, routesFree), and NotBefore cannot tell
	// after the CA's clock went back.
	Seq int64 `json:"seq,omitempty"`
}

// caIndex is the CA's record of what it issued and revoked. The CRL is
// derived from it.
type caIndex struct {
	MeshPrefix string       `json:"mesh_prefix"`
	CRLNumber  int64        `json:"crl_number"`
	Certs      []IssuedCert `json:"certs"`
	// Renewals holds, by serial, the certificate (DER) of each gateway's
	// latest renewal, if that is its latest certificate (keepRenewal).
	Renewals map[string][]byte `json:"renewals,omitempty"`
	// LastSeq is the Seq given last.
	LastSeq int64 `json:"last_seq,omitempty"`
	// ArchivedEnd is the latest end (NotAfter) of an entry the archive
	// holds and the index does not: while the CA's clock is less than
	// archiveAfter past it, the archive may hold a certificate not over
	// yet, and is read (restoreLocked); otherwise it is not. Zero in an
	// index of an earlier release, whose archive is read once.
	ArchivedEnd time.Time `json:"archived_end,omitzero"`
}

// add appends e to the index, numbered.
func (idx *caIndex) add(e IssuedCert) {
	idx.LastSeq++
	e.Seq = idx.LastSeq
	idx.Certs = append(idx.Certs, e)
}

// RoutesFree reports, before anything is issued, whether a gateway
// with attributes a would be refused for routes overlapping another
// site's (see Issue): a burst site checks it when it opens, rather than at
// each of its gateways' enrollment.
func (ca *CA) RoutesFree(a Attributes, now time.Time) error {
	idx, err := ca.readIndexAt(now)
	if err != nil {
		return err
	}
	a.Normalize()
	return routesFree(idx, a, now)
}

// Issued lists the certificates this CA has issued, oldest first, as the
// index was last written: what the archive gives back once the CA's clock
// is right again (restoreLocked) is listed after the CA's next operation.
func (ca *CA) Issued() ([]IssuedCert, error) {
	idx, err := ca.readIndex()
	if err != nil {
		return nil, err
	}
	return idx.Certs, nil
}

// Revocation reasons accepted by Revoke (RFC 5280 names).
var revocationReasons = map[string]int{
	"unspecified":          0,
	"keyCompromise":        1,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
}

// RevocationReasons lists the reasons Revoke accepts.
func RevocationReasons() []string {
	out := make([]string, 0, len(revocationReasons))
	for r := range revocationReasons {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// keptForGood reports whether the CA keeps a certificate in its index,
// and, once revoked, on its revocation list, after it has expired: a
// policy signer's (its policies are judged at their signing time), and a
// revoked gateway's unless the revocation says nothing is wrong with its
// key (a burst that ended, a gateway retired, renewed or moved) — audit
// records are judged at their own time, and what a stolen key signed after
// the revocation must still be refused. The others, thousands a day with
// bursts, leave the list once expired and the index 30 days later.
func keptForGood(c IssuedCert) bool {
	if c.Kind == KindPolicySigner {
		return true
	}
	switch c.Reason {
	case "cessationOfOperation", "superseded", "affiliationChanged":
		return false
	}
	return c.RevokedAt != nil
}

// bySerial maps serials to their place in the index.
func (idx *caIndex) bySerial() map[string]int {
	m := make(map[string]int, len(idx.Certs))
	for i, c := range idx.Certs {
		m[c.Serial] = i
	}
	return m
}

// reasonName is the name of a CRL reason code.
func reasonName(code int) string {
	for name, c := range revocationReasons {
		if c == code {
			return name
		}
	}
	return "unspecified"
}

// RevokeSerials adds the certificates with the given serials to the CA-signed
// revocation list and returns the index entries that were revoked. Revoking
// an already revoked serial is not an error; an unknown serial is.
// Revoked for keyCompromise, its renewals are revoked with it: whoever
// holds its key may have had them issued (CA.Renew), and a thief would
// keep renewing one the operator does not know of. For any other reason
// (a certificate a renewal superseded, retired) they stand: its gateway
// runs on them.
func (ca *CA) RevokeSerials(serials []*big.Int, reason string, now time.Time) ([]IssuedCert, error) {
	return ca.revoke(reason, now, func(idx *caIndex) ([]int, error) {
		at := idx.bySerial()
		out := make([]int, 0, len(serials))
		for _, s := range serials {
			want := FormatSerial(s)
			i, ok := at[want]
			if !ok {
				return nil, fmt.Errorf("serial %s was not issued by this CA, or ended over 30 days ago (see skybridge ca list, and issued-archive.jsonl in the CA directory)", want)
			}
			out = append(out, i)
		}
		if reason == "keyCompromise" {
			return idx.withRenewals(out), nil
		}
		return out, nil
	})
}

// TakeBack revokes a certificate that was issued but never delivered (its
// output could not be written): it holds nothing against a retry, and is
// not its gateway's latest for a renewal (CA.Renew).
func (ca *CA) TakeBack(serial *big.Int, now time.Time) error {
	_, err := ca.revoke("cessationOfOperation", now, func(idx *caIndex) ([]int, error) {
		i, ok := idx.bySerial()[FormatSerial(serial)]
		if !ok {
			return nil, fmt.Errorf("serial %s was not issued by this CA", FormatSerial(serial))
		}
		idx.Certs[i].TakenBack = true
		return []int{i}, nil
	})
	return err
}

// withRenewals adds to picked (places in the index) the renewals of
// what it holds, and theirs, in turn.
func (idx *caIndex) withRenewals(picked []int) []int {
	in := map[string]bool{}
	for _, i := range picked {
		in[idx.Certs[i].Serial] = true
	}
	for grew := true; grew; {
		grew = false
		for i, e := range idx.Certs {
			if e.RenewedFrom != "" && in[e.RenewedFrom] && !in[e.Serial] {
				in[e.Serial], grew = true, true
				picked = append(picked, i)
			}
		}
	}
	return picked
}

// RevokeNode revokes every certificate of node that is neither expired
// nor revoked at now (validOfNode). The certificates are looked up under
// the CA's lock, with the revocation, so one issued to the node meanwhile
// (a renewal in flight) is revoked too rather than left valid.
func (ca *CA) RevokeNode(node, reason string, now time.Time) ([]IssuedCert, error) {
	return ca.revoke(reason, now, func(idx *caIndex) ([]int, error) {
		out := idx.validOfNode(node, now)
		if len(out) == 0 {
			if len(idx.validOfSigner(node, now)) > 0 {
				return nil, fmt.Errorf("node %q has no valid certificate issued by this CA, but a policy signer of that name has: revoke a policy signer with `skybridge ca revoke --signer %s`", node, node)
			}
			return nil, fmt.Errorf("node %q has no valid certificate issued by this CA (see skybridge ca list)", node)
		}
		return out, nil
	})
}

// RevokeSigner revokes every certificate of the policy signer called name
// that is neither expired nor revoked at now, as RevokeNode does a
// node's.
func (ca *CA) RevokeSigner(name, reason string, now time.Time) ([]IssuedCert, error) {
	return ca.revoke(reason, now, func(idx *caIndex) ([]int, error) {
		out := idx.validOfSigner(name, now)
		if len(out) == 0 {
			return nil, fmt.Errorf("policy signer %q has no valid certificate issued by this CA (see skybridge ca list)", name)
		}
		return out, nil
	})
}

// revoke revokes the index entries pick chooses, under the CA's lock.
// Where that changes nothing (each was revoked already, for the reason
// it keeps) no new list is signed: a revocation repeated, by a script
// run again or a serial given twice, would otherwise number and date a
// new list that says what the last one said.
func (ca *CA) revoke(reason string, now time.Time, pick func(*caIndex) ([]int, error)) ([]IssuedCert, error) {
	if reason == "" {
		reason = "unspecified"
	}
	if _, ok := revocationReasons[reason]; !ok {
		return nil, fmt.Errorf("revocation reason %q is unknown; use one of %v", reason, RevocationReasons())
	}
	var done []IssuedCert
	err := ca.updateIndex(now, func(idx *caIndex) error {
		done = nil
		before := slices.Clone(idx.Certs) // pick may change an entry too (TakeBack)
		picked, err := pick(idx)
		if err != nil {
			return err
		}
		changed, seen := false, map[int]bool{}
		for _, i := range picked {
			if seen[i] {
				continue
			}
			seen[i] = true
			switch c := &idx.Certs[i]; {
			case c.RevokedAt == nil:
				t := now.UTC()
				c.RevokedAt, c.Reason = &t, reason
			case reason == "keyCompromise" && c.Reason != reason:
				// Learnt later that the key was stolen (RFC 5280 lets a
				// reason change to this one): the entry then stays on
				// the list after the certificate expires (keptForGood),
				// so what the key signs later is still refused.
				c.Reason = reason
			}
			e, was := idx.Certs[i], before[i]
			e.AlreadyRevoked = was.RevokedAt != nil && was.Reason == e.Reason && was.TakenBack == e.TakenBack
			changed = changed || !e.AlreadyRevoked
			done = append(done, e)
		}
		if !changed && ca.crlLists(done, now) {
			return errUnchanged
		}
		// The CRL is written before the index: if we crash between the
		// two, the serial is already revoked for the mesh, and the next
		// CRL carries it on (writeCRL).
		return ca.writeCRL(idx, now)
	})
	if err != nil {
		return nil, err
	}
	return done, nil
}

// crlLists reports whether the CA's revocation list, still current at
// now, lists every one of entries. One the index holds revoked may be
// missing from it (crl.pem restored from a backup older than the index):
// revoking it again then signs the list that carries it.
func (ca *CA) crlLists(entries []IssuedCert, now time.Time) bool {
	b, err := os.ReadFile(filepath.Join(ca.dir, fileCRL))
	if err != nil {
		return false
	}
	crl, err := ParseCRL(b)
	if err != nil || crl.CheckSignatureFrom(ca.cert) != nil {
		return false // writeCRL says what is wrong with it
	}
	if !now.Before(crl.NextUpdate) {
		return false
	}
	listed := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		listed[FormatSerial(e.SerialNumber)] = true
	}
	for _, e := range entries {
		if !listed[e.Serial] {
			return false
		}
	}
	return true
}

// validOfNode returns the places in the index of the node's certificates
// that are neither expired nor revoked at now: its gateway's, and its
// enrollment endpoint's, whose key the gateway holds. Not a policy
// signer's: signers are named apart from gateways, and one of the same
// name is another holder's (validOfSigner).
func (idx *caIndex) validOfNode(node string, now time.Time) []int {
	return idx.valid(now, func(e IssuedCert) bool {
		return e.Node == node && (e.Kind == KindGateway || e.Kind == "" || e.Kind == KindEnroller)
	})
}

// validOfSigner is validOfNode of the policy signer called name.
func (idx *caIndex) validOfSigner(name string, now time.Time) []int {
	return idx.valid(now, func(e IssuedCert) bool { return e.Node == name && e.Kind == KindPolicySigner })
}

// valid returns the places in the index of the certificates of picks
// that are neither expired nor revoked at now.
func (idx *caIndex) valid(now time.Time, of func(IssuedCert) bool) []int {
	var out []int
	for i, e := range idx.Certs {
		if of(e) && e.RevokedAt == nil && e.NotAfter.After(now) {
			out = append(out, i)
		}
	}
	return out
}

// SerialsOfNode returns the serials of the node's certificates that are
// neither expired nor revoked at now.
func (ca *CA) SerialsOfNode(node string, now time.Time) ([]*big.Int, error) {
	idx, err := ca.readIndexAt(now)
	if err != nil {
		return nil, err
	}
	var out []*big.Int
	for _, i := range idx.validOfNode(node, now) {
		s, err := ParseSerial(idx.Certs[i].Serial)
		if err != nil {
			return nil, fmt.Errorf("CA index: %w", err)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("node %q has no valid certificate issued by this CA", node)
	}
	return out, nil
}

// RefreshCRL re-signs the revocation list with a new number and validity,
// for operators who publish it to tools that honour nextUpdate.
func (ca *CA) RefreshCRL(now time.Time) error {
	return ca.updateIndex(now, func(idx *caIndex) error { return ca.writeCRL(idx, now) })
}

// TakeNewerCRL writes crl, signed by this CA, as the CA's revocation list
// if it is later than the one the CA holds — whose directory was restored
// from a backup, say: its next list would be numbered below what the mesh
// holds, and ignored by every gateway. It reports whether it did. A
// revocation the CA made since it fell behind is on its list only, not on
// crl: the next list, which takes crl's revocations in, is signed at once
// (only then, so that two copies of a CA directory taking each other's
// lists settle rather than outbid each other).
func (ca *CA) TakeNewerCRL(crl *x509.RevocationList) (bool, error) {
	if crl == nil || crl.Number == nil || crl.CheckSignatureFrom(ca.cert) != nil {
		return false, nil
	}
	now := time.Now()
	took := false
	err := ca.updateIndex(now, func(idx *caIndex) error {
		if b, err := os.ReadFile(filepath.Join(ca.dir, fileCRL)); err == nil {
			if cur, err := ParseCRL(b); err == nil && cur.Number != nil && cur.Number.Cmp(crl.Number) >= 0 {
				return errUnchanged
			}
		}
		if err := atomicfile.WriteFile(filepath.Join(ca.dir, fileCRL), encodePEM(pemCRL, crl.Raw), 0o644); err != nil {
			return err
		}
		took = true
		if !idx.revokesBeyond(crl, now) {
			return errUnchanged
		}
		return ca.writeCRL(idx, now)
	})
	return took, err
}

// onList says whether a list signed at now names e: revoked, and a
// policy signer's or not expired by more than the clock skew the mesh
// allows. A gateway whose clock runs behind the CA's by up to
// MaxClockSkew takes a certificate for valid that long past its end;
// dropped from the list at its end, a revoked one would be taken by it
// again.
func onList(e IssuedCert, now time.Time) bool {
	return e.RevokedAt != nil && (keptForGood(e) || !e.NotAfter.Before(now.Add(-MaxClockSkew)))
}

// revokesBeyond says whether the index revokes a certificate that a list
// it signs now would name and crl does not.
func (idx *caIndex) revokesBeyond(crl *x509.RevocationList, now time.Time) bool {
	on := make(map[string]bool, len(crl.RevokedCertificateEntries))
	for _, e := range crl.RevokedCertificateEntries {
		on[FormatSerial(e.SerialNumber)] = true
	}
	for _, e := range idx.Certs {
		if onList(e, now) && !on[e.Serial] {
			return true
		}
	}
	return false
}

// CRLPEM returns the current revocation list.
func (ca *CA) CRLPEM() ([]byte, error) {
	return os.ReadFile(filepath.Join(ca.dir, fileCRL))
}

// writeCRL signs the next revocation list from the index and stores it.
// The list in force may be ahead of the index: written, and the index not
// (a crash, a full disk between the two). Its number is not used again —
// gateways ignore a list whose number they have, so a different list
// under it would never spread — and its revocations are taken into the
// index, so no later list drops them. When the index is behind the list
// (restored from an older backup) a revocation it does not know at all is
// taken in too, as an entry of its own that lasts as long as the CA could
// have made the certificate last: it is never dropped for want of its
// certificate's record. (An index in step with the list lacks only entries
// it archived, which the list had dropped first.)
func (ca *CA) writeCRL(idx *caIndex, now time.Time) error {
	if b, err := os.ReadFile(filepath.Join(ca.dir, fileCRL)); err == nil {
		prev, err := ParseCRL(b)
		if err != nil {
			return fmt.Errorf("the CA's revocation list %s: %w; it cannot be carried on: restore it from a backup", filepath.Join(ca.dir, fileCRL), err)
		}
		if err := prev.CheckSignatureFrom(ca.cert); err != nil {
			// Another CA's (copied over this one's): neither its number
			// nor its serials are this CA's to carry on.
			return fmt.Errorf("the revocation list %s is not signed by this CA (%v): restore this CA's from a backup, or move it away to sign a new one from the CA's index", filepath.Join(ca.dir, fileCRL), err)
		}
		behind := prev.Number != nil && prev.Number.IsInt64() && prev.Number.Int64() > idx.CRLNumber
		if prev.Number != nil && prev.Number.IsInt64() {
			idx.CRLNumber = max(idx.CRLNumber, prev.Number.Int64())
		}
		at := idx.bySerial()
		for _, e := range prev.RevokedCertificateEntries {
			i, ok := at[FormatSerial(e.SerialNumber)]
			switch {
			case !ok && behind:
				rt := e.RevocationTime.UTC()
				idx.add(IssuedCert{Serial: FormatSerial(e.SerialNumber), Node: "(unknown: the index was behind the revocation list)",
					NotAfter: ca.cert.NotAfter, RevokedAt: &rt, Reason: reasonName(e.ReasonCode)})
			case !ok:
			case idx.Certs[i].RevokedAt == nil:
				at := e.RevocationTime.UTC()
				idx.Certs[i].RevokedAt, idx.Certs[i].Reason = &at, reasonName(e.ReasonCode)
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read the CA's revocation list: %w", err)
	}
	idx.CRLNumber++
	var entries []x509.RevocationListEntry
	for _, e := range idx.Certs {
		// A gateway certificate that has expired is refused as expired:
		// its entry goes (RFC 5280 allows it), or a CA that ends a
		// burst of 2,000 gateways a day would sign, and every state
		// exchange carry, a list growing by 100 KB a day. Replays are
		// caught by the list's number, not its entries. A policy
		// signer's stays: a policy is judged at its signing time, when
		// the signer was valid, and only the list says it was revoked.
		if !onList(e, now) {
			continue
		}
		s, err := ParseSerial(e.Serial)
		if err != nil {
			return fmt.Errorf("CA index: %w", err)
		}
		entries = append(entries, x509.RevocationListEntry{SerialNumber: s, RevocationTime: *e.RevokedAt, ReasonCode: revocationReasons[e.Reason]})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(idx.CRLNumber),
		ThisUpdate:                now.Add(-backdate),
		NextUpdate:                now.Add(crlValidity),
		RevokedCertificateEntries: entries,
	}, ca.cert, ca.key)
	if err != nil {
		return fmt.Errorf("sign revocation list: %w", err)
	}
	return atomicfile.WriteFile(filepath.Join(ca.dir, fileCRL), encodePEM(pemCRL, der), 0o644)
}

func (ca *CA) readIndex() (*caIndex, error) {
	var idx caIndex
	file := filepath.Join(ca.dir, fileIndex)
	found, err := atomicfile.ReadJSON(file, &idx)
	if err == nil && !found {
		err = fmt.Errorf("%s: %w", file, os.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("read CA index: %w", err)
	}
	return &idx, nil
}

func (ca *CA) writeIndex(idx *caIndex) error {
	return atomicfile.WriteJSON(filepath.Join(ca.dir, fileIndex), idx, 0o600)
}

// updateIndex runs fn on the index under the CA's lock and writes the
// index back if fn succeeds, so concurrent `skybridge ca` processes never
// lose each other's changes. fn returns errUnchanged for success that
// changed nothing: the index, which can be large, is not rewritten.
func (ca *CA) updateIndex(now time.Time, fn func(*caIndex) error) error {
	unlock, err := lockFile(filepath.Join(ca.dir, fileLock))
	if err != nil {
		return err
	}
	defer unlock()
	idx, err := ca.readIndex()
	if err != nil {
		return err
	}
	if err := ca.restoreLocked(idx, now); err != nil {
		return err
	}
	idx.number()
	if err := fn(idx); errors.Is(err, errUnchanged) {
		return nil
	} else if err != nil {
		return err
	}
	if err := ca.archiveLocked(idx, now); err != nil {
		return err
	}
	return ca.writeIndex(idx)
}

// errUnchanged is what an updateIndex function returns for success that
// changed nothing.
var errUnchanged = errors.New("index unchanged")

// archiveAfter is how long after its end a gateway certificate leaves the
// index for the archive.
const archiveAfter = 30 * 24 * time.Hour

// archiveLocked moves the gateway certificates that ended more than
// archiveAfter ago from the index to the archive (fileArchive, JSON lines,
// appended and synced first: a crash between the two can list one twice,
// never lose it). The index is read and rewritten whole by every issue
// and revocation, and a CA enrolling 2,000 burst gateways a day would add
// half a megabyte a day to it; ended certificates are off the revocation
// list and cannot conflict with anything. Policy signers stay: the list
// must name a revoked one for as long as its policies can be checked.
// What the CA archived while its clock ran ahead comes back once the
// clock is right (restoreLocked), found by ArchivedEnd.
func (ca *CA) archiveLocked(idx *caIndex, now time.Time) error {
	cutoff := now.Add(-archiveAfter)
	var old, keep []IssuedCert
	end := idx.ArchivedEnd
	for _, c := range idx.Certs {
		if !keptForGood(c) && c.NotAfter.Before(cutoff) {
			old = append(old, c)
			delete(idx.Renewals, c.Serial)
			if c.NotAfter.After(end) {
				end = c.NotAfter
			}
		} else {
			keep = append(keep, c)
		}
	}
	if len(old) == 0 {
		return nil
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	for _, c := range old {
		if err := enc.Encode(c); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(filepath.Join(ca.dir, fileArchive), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("CA archive: %w", err)
	}
	// An append cut short (a full disk, a crash) left part of a line:
	// the entries after it would be joined to it. Its entries are still
	// in the index, which was not written, and come again now.
	if _, err := atomicfile.CutPartialLine(f); err != nil {
		f.Close()
		return fmt.Errorf("CA archive: %w", err)
	}
	if _, err := f.Write(b.Bytes()); err != nil {
		f.Close()
		return fmt.Errorf("CA archive: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("CA archive: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("CA archive: %w", err)
	}
	idx.Certs, idx.ArchivedEnd = keep, end
	return nil
}

// readIndexAt is readIndex for a reader that judges the index at now: if
// the archive may hold certificates not over by now (restoreLocked), they
// are brought back first, under the CA's lock.
func (ca *CA) readIndexAt(now time.Time) (*caIndex, error) {
	idx, err := ca.readIndex()
	if err != nil {
		return nil, err
	}
	if back, err := ca.archiveMayGiveBack(idx, now); err != nil || !back {
		return idx, err
	}
	err = ca.updateIndex(now, func(locked *caIndex) error {
		idx = locked
		return errUnchanged
	})
	if err != nil {
		return nil, err
	}
	return idx, nil
}

// restoreCutoff is the end (NotAfter) from which an archived entry comes
// back at now: archiveAfter before it, give or take restoreSlack. Without
// the slack, operations dated a little back (the enrollment endpoint's
// certificate is backdated by the clocks' allowance; a renewal that waited
// for the lock) brought back what the one before had just archived, the
// whole archive read and rewritten under the lock each time.
func restoreCutoff(now time.Time) time.Time { return now.Add(-archiveAfter + restoreSlack) }

const restoreSlack = time.Hour

// archiveMayGiveBack says whether the archive may hold an entry that is
// not archiveAfter past its end at now: only when the CA's clock went back
// past what it archived (ArchivedEnd), or the index does not say.
func (ca *CA) archiveMayGiveBack(idx *caIndex, now time.Time) (bool, error) {
	if !idx.ArchivedEnd.IsZero() {
		return !idx.ArchivedEnd.Before(restoreCutoff(now)), nil
	}
	fi, err := os.Stat(filepath.Join(ca.dir, fileArchive))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("CA archive: %w", err)
	}
	return fi.Size() > 0, nil
}

// restoreLocked brings back from the archive into the index, before an
// operation, the entries that are not archiveAfter past their end at now.
// A CA whose clock ran ahead (a bad NTP server, a VM's clock) archived
// certificates still valid by the gateways' clocks; left there once the
// clock is right again, their revocations would leave the next list, their
// addresses and routes be given out again, and neither `ca revoke` nor a
// renewal find them. Their revocations come back with them, and a list
// that drops one is signed anew at once: gateways adopted the one signed
// while the clock was ahead. The index is written, then the archive
// rewritten without them (a crash between the two leaves lines of entries
// the index holds, which are dropped here the next time, and an entry
// archived again meanwhile listed twice: the later line is its later
// state). The archive is read only while the clock is behind what it
// archived, so this costs nothing as the clock goes forward.
func (ca *CA) restoreLocked(idx *caIndex, now time.Time) error {
	if back, err := ca.archiveMayGiveBack(idx, now); err != nil || !back {
		return err
	}
	file := filepath.Join(ca.dir, fileArchive)
	b, err := os.ReadFile(file)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("CA archive: %w", err)
	}
	// A last line without its newline is an append cut short, whose
	// entries the index still holds (archiveLocked).
	whole := b[:bytes.LastIndexByte(b, '\n')+1]
	type line struct {
		c   IssuedCert
		raw []byte
	}
	var lines []line
	last := map[string]int{}
	lowest := int64(1) // the lowest number the archive holds
	for n, l := range bytes.Split(whole, []byte{'\n'}) {
		if l = bytes.TrimSpace(l); len(l) == 0 {
			continue
		}
		var c IssuedCert
		err := json.Unmarshal(l, &c)
		if err == nil && c.Serial == "" {
			err = errors.New("no serial")
		}
		if err != nil {
			return fmt.Errorf("CA archive %s, line %d: %w: the archive is read back for certificates archived while the CA's clock ran ahead; restore it from a backup, or remove the line", file, n+1, err)
		}
		last[c.Serial] = len(lines)
		lines = append(lines, line{c, l})
		// An index an earlier release rewrote (a rollback) lost its
		// numbers, and numbers them again above those archived.
		idx.LastSeq = max(idx.LastSeq, c.Seq)
		if c.Seq != 0 {
			lowest = min(lowest, c.Seq)
		}
	}
	idx.number()
	cutoff := restoreCutoff(now)
	in := idx.bySerial()
	var back []IssuedCert
	var stay bytes.Buffer
	var end time.Time
	for i, l := range lines {
		if _, ok := in[l.c.Serial]; ok || last[l.c.Serial] != i {
			continue
		}
		if !l.c.NotAfter.Before(cutoff) {
			back = append(back, l.c)
			continue
		}
		stay.Write(l.raw)
		stay.WriteByte('\n')
		if l.c.NotAfter.After(end) {
			end = l.c.NotAfter
		}
	}
	rewrite := stay.Len() != len(b)
	if len(back) == 0 && !rewrite && end.Equal(idx.ArchivedEnd) {
		return nil
	}
	idx.putBack(back, lowest)
	idx.ArchivedEnd = end
	if slices.ContainsFunc(back, func(c IssuedCert) bool { return c.RevokedAt != nil }) && ca.crlDrops(idx, now) {
		if err := ca.writeCRL(idx, now); err != nil {
			return err
		}
	}
	if err := ca.writeIndex(idx); err != nil {
		return err
	}
	if !rewrite {
		return nil
	}
	if err := atomicfile.WriteFile(file, stay.Bytes(), 0o600); err != nil {
		return fmt.Errorf("CA archive: %w", err)
	}
	return nil
}

// crlDrops says whether the CA's revocation list leaves out a revocation
// of the index that a list signed at now would name. A list that cannot
// be read, or is another CA's, is left to the next revocation, which says
// what is wrong with it (writeCRL).
func (ca *CA) crlDrops(idx *caIndex, now time.Time) bool {
	b, err := os.ReadFile(filepath.Join(ca.dir, fileCRL))
	if err != nil {
		return false
	}
	crl, err := ParseCRL(b)
	if err != nil || crl.CheckSignatureFrom(ca.cert) != nil {
		return false
	}
	return idx.revokesBeyond(crl, now)
}

// number gives the entries an earlier release wrote, unnumbered, their
// numbers, in index order: they were issued before any numbered one (a
// release that numbers nothing rewrites every entry without its number).
// Numbered, an entry the archive gives back goes back before them.
func (idx *caIndex) number() {
	for i := range idx.Certs {
		if idx.Certs[i].Seq == 0 {
			idx.LastSeq++
			idx.Certs[i].Seq = idx.LastSeq
		}
	}
}

// putBack puts entries the archive gave back into the index (numbered:
// number) at their places by Seq; those an earlier release archived,
// unnumbered, first: a gateway's were its earlier certificates, which
// ended first.
func (idx *caIndex) putBack(back []IssuedCert, lowest int64) {
	if len(back) == 0 {
		return
	}
	// Those unnumbered are numbered below every number given (negative,
	// if need be; lowest is the archive's), in the archive's order:
	// numbered last, they would read as the latest at the next give-back,
	// which goes by number; and the index's own, and the archive's, keep
	// theirs.
	for _, c := range idx.Certs {
		if c.Seq != 0 {
			lowest = min(lowest, c.Seq)
		}
	}
	n := int64(0)
	for _, c := range back {
		if c.Seq == 0 {
			n++
		}
	}
	top := lowest - 1
	if top < n { // down through 0, which says "unnumbered"
		top = min(top, -1)
	}
	for i, next := 0, top-n+1; i < len(back); i++ {
		if back[i].Seq == 0 {
			back[i].Seq, next = next, next+1
		}
	}
	slices.SortStableFunc(back, func(a, b IssuedCert) int { return cmp.Compare(a.Seq, b.Seq) })
	out := make([]IssuedCert, 0, len(idx.Certs)+len(back))
	for _, c := range idx.Certs {
		for len(back) > 0 && back[0].Seq < c.Seq {
			out = append(out, back[0])
			idx.LastSeq = max(idx.LastSeq, back[0].Seq)
			back = back[1:]
		}
		out = append(out, c)
	}
	for _, c := range back {
		idx.LastSeq = max(idx.LastSeq, c.Seq)
	}
	idx.Certs = append(out, back...)
}

// randomSerial returns a positive 127-bit serial: unpredictable, as the
// CA/Browser Forum requires of public CAs, and never zero.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 127)
	s, err := rand.Int(rand.Reader, limit)
	if err != nil {
		return nil, fmt.Errorf("generate serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
