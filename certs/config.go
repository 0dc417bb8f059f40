package certs

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/skybridge-mesh/skybridge/internal/hclconf"
)

// Back ends.
const (
	BackendFile  = "file"
	BackendVault = "vault"
)

// NodeConfig is the `node` block of a gateway configuration: the attributes
// the gateway asks to be certified with.
//
//	node {
//	  name         = "gw1"
//	  site         = "onprem-zrh"
//	  region       = "zrh-dc1"
//	  provider     = "onprem"
//	  jurisdiction = "CH"
//	  overlay_ip   = "100.96.0.1"
//	  routes       = ["10.1.0.0/16"]
//	  labels       = { classes = "swiss-banking-secret" }
//	}
type NodeConfig struct {
	Name         string            `hcl:"name,optional"`
	Site         string            `hcl:"site,optional"`
	Region       string            `hcl:"region,optional"`
	Provider     string            `hcl:"provider,optional"`
	Jurisdiction string            `hcl:"jurisdiction,optional"`
	OverlayIP    string            `hcl:"overlay_ip,optional"`
	Routes       []string          `hcl:"routes,optional"`
	Labels       map[string]string `hcl:"labels,optional"`
	Body         hcl.Body          `hcl:",body"`
}

// NodeConfig is the node block that asks for exactly these attributes,
// the inverse of NodeConfig.Attributes.
func (a *Attributes) NodeConfig() NodeConfig {
	n := NodeConfig{Name: a.Node, Site: a.Site, Region: a.Region, Provider: a.Provider, Jurisdiction: a.Jurisdiction,
		OverlayIP: a.OverlayIP.String(), Labels: a.Labels}
	for _, r := range a.Routes {
		n.Routes = append(n.Routes, r.String())
	}
	return n
}

// Attributes converts and validates the block. Every attribute is
// required here; the fields are optional in HCL only because a burst
// gateway takes them from the certificate its join token obtained.
func (n *NodeConfig) Attributes(meshPrefix netip.Prefix) (Attributes, error) {
	var missing []string
	for _, f := range []struct{ name, v string }{{"name", n.Name}, {"site", n.Site}, {"region", n.Region}, {"provider", n.Provider}, {"jurisdiction", n.Jurisdiction}, {"overlay_ip", n.OverlayIP}} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return Attributes{}, hclconf.Errorf(n.Body, "node", "the node block lacks %s: describe this gateway there, or start a burst gateway with --join-token",
			strings.Join(missing, ", "))
	}
	a := Attributes{Node: n.Name, Site: n.Site, Region: n.Region, Provider: n.Provider, Jurisdiction: n.Jurisdiction, Labels: n.Labels}
	ip, err := netip.ParseAddr(n.OverlayIP)
	if err != nil {
		return a, hclconf.Errorf(n.Body, "overlay_ip", "%q is not an IP address", n.OverlayIP)
	}
	a.OverlayIP = ip
	for _, r := range n.Routes {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			return a, hclconf.Errorf(n.Body, "routes", "%q is not a CIDR prefix such as 10.1.0.0/16", r)
		}
		a.Routes = append(a.Routes, p)
	}
	a.Normalize()
	if err := a.Validate(meshPrefix); err != nil {
		return a, hclconf.Errorf(n.Body, "node", "%v", err)
	}
	return a, nil
}

// Config is the `identity` block of a gateway configuration: where the
// gateway's identity comes from. Choosing Vault instead of the embedded CA
// is a change here, not in code.
//
//	identity {
//	  backend   = "file"               # or "vault"
//	  dir       = "/var/lib/skybridge/identity"
//	  mesh_cidr = "100.96.0.0/16"      # needed when the CA has no IP name constraint (Vault)
//	  ttl       = "24h"                # certificate lifetime asked of an issuer; Vault: "role" lets the PKI role decide
//	  ca_dir    = "/etc/skybridge/ca"  # file back end: let the gateway renew from a local CA
//	  renew_from = ["198.51.100.1:7947"] # file back end without ca_dir: renew through the CA-holding gateway
//	  refresh   = "1m"                 # how often a gateway with an issuer reads its CAs and revocation lists
//	  vault { ... }                    # see VaultConfig
//	}
type Config struct {
	Backend  string `hcl:"backend,optional"`
	Dir      string `hcl:"dir,optional"` // a gateway defaults it to state_dir/identity
	MeshCIDR string `hcl:"mesh_cidr,optional"`
	TTL      string `hcl:"ttl,optional"`
	CADir    string `hcl:"ca_dir,optional"`
	// RenewFrom names the enrollment endpoints (host:port) of gateways
	// holding the mesh CA, through which a gateway whose identity was
	// issued offline renews it (certs.RenewPath).
	RenewFrom []string     `hcl:"renew_from,optional"`
	Refresh   string       `hcl:"refresh,optional"`
	Vault     *VaultConfig `hcl:"vault,block"`
	Body      hcl.Body     `hcl:",body"`

	// RideOutOutage lets Open return while Vault cannot be reached (no
	// connection, sealed): the gateway then starts from the identity,
	// trust bundle and secrets it keeps in Dir and logs in once Vault is
	// back. Set by a gateway that starts, never by the configuration
	// file: a command run by hand should say at once that Vault is down.
	RideOutOutage bool
}

// VaultConfig selects a Vault server, its PKI and KV v2 mounts and how to
// log in.
//
//	vault {
//	  address   = "https://vault.bank.example:8200"  # default: $VAULT_ADDR
//	  ca_cert   = "/etc/skybridge/vault-ca.pem"
//	  pki_mount = "pki"
//	  pki_role  = "skybridge-gateway"
//	  kv_mount  = "kv"
//	  kv_prefix = "skybridge"
//	  auth {
//	    method         = "approle"              # or "token"
//	    role_id        = "..."                  # or role_id_file
//	    secret_id_file = "/run/skybridge/secret-id"
//	    wrapped        = true                   # the file holds a response-wrapping token
//	  }
//	}
type VaultConfig struct {
	Address   string `hcl:"address,optional"`
	CACert    string `hcl:"ca_cert,optional"`
	Namespace string `hcl:"namespace,optional"`
	PKIMount  string `hcl:"pki_mount,optional"`
	PKIRole   string `hcl:"pki_role"`
	KVMount   string `hcl:"kv_mount,optional"`
	KVPrefix  string `hcl:"kv_prefix,optional"`
	// PinOverlayIP asks for certificates whose attribute URI names the
	// overlay IP (Attributes.PinnedURI), as a Vault burst role requires:
	// set on burst gateways from their join token.
	PinOverlayIP bool      `hcl:"pin_overlay_ip,optional"`
	Auth         VaultAuth `hcl:"auth,block"`
	Body         hcl.Body  `hcl:",body"`
}

// VaultAuth says how a gateway logs in to Vault.
type VaultAuth struct {
	Method       string `hcl:"method"`
	TokenFile    string `hcl:"token_file,optional"` // token: default $VAULT_TOKEN
	Mount        string `hcl:"mount,optional"`      // approle: default "approle"
	RoleID       string `hcl:"role_id,optional"`
	RoleIDFile   string `hcl:"role_id_file,optional"`
	SecretIDFile string `hcl:"secret_id_file,optional"`
	SecretIDEnv  string `hcl:"secret_id_env,optional"`
	// Wrapped: the SecretID is a response-wrapping token, which Vault
	// unwraps once. Each later login (the token's maximum TTL, a token
	// refused) needs a new one in the file, put there by whatever
	// delivers them; without it the gateway keeps its certificate until
	// it expires and says why it cannot renew.
	Wrapped bool     `hcl:"wrapped,optional"`
	Body    hcl.Body `hcl:",body"`
}

// settings is Config after validation.
type settings struct {
	backend    string
	dir        string
	meshPrefix netip.Prefix
	ttl        time.Duration
	caDir      string
	renewFrom  []string
	refresh    time.Duration
	vault      *VaultConfig
	rideOut    bool
}

// DefaultRefresh is how often a gateway with an issuer asks it for its
// CAs and revocation lists, unless identity.refresh says otherwise.
const DefaultRefresh = time.Minute

// maxRefresh bounds identity.refresh: a revocation made at the issuer
// reaches the mesh within it (gossip spreads it from the first gateway
// that reads it).
const maxRefresh = time.Hour

// minTTL is the shortest certificate life a configuration may ask for.
const minTTL = 10 * time.Second

func (c *Config) validate() (*settings, error) {
	s := &settings{backend: c.Backend, dir: c.Dir, caDir: c.CADir, renewFrom: c.RenewFrom, vault: c.Vault, ttl: DefaultNodeTTL, rideOut: c.RideOutOutage, refresh: DefaultRefresh}
	if s.backend == "" {
		s.backend = BackendFile
	}
	var errs []error
	switch s.backend {
	case BackendFile:
		if c.Vault != nil {
			errs = append(errs, hclconf.Errorf(c.Body, "vault", "a vault block needs backend = %q", BackendVault))
		}
	case BackendVault:
		if c.Vault == nil {
			errs = append(errs, hclconf.Errorf(c.Body, "vault", "backend = %q needs a vault block", BackendVault))
		}
		if c.CADir != "" {
			errs = append(errs, hclconf.Errorf(c.Body, "ca_dir", "only the file back end uses a local CA"))
		}
		s.ttl = 24 * time.Hour
	default:
		errs = append(errs, hclconf.Errorf(c.Body, "backend", "%q is not a back end; use %q or %q", c.Backend, BackendFile, BackendVault))
	}
	if len(c.RenewFrom) > 0 {
		switch {
		case s.backend != BackendFile:
			errs = append(errs, hclconf.Errorf(c.Body, "renew_from", "a gateway of the vault back end renews from Vault; remove renew_from"))
		case c.CADir != "":
			errs = append(errs, hclconf.Errorf(c.Body, "renew_from", "a gateway with ca_dir renews from its CA; remove renew_from"))
		default:
			if err := checkRenewFrom(c.RenewFrom); err != nil {
				errs = append(errs, hclconf.Errorf(c.Body, "renew_from", "%v", err))
			}
		}
	}
	// Blank paths are not made absolute (ResolvePaths): taken, they
	// would name files under whatever directory the gateway was started in.
	if strings.TrimSpace(c.Dir) == "" {
		errs = append(errs, hclconf.Errorf(c.Body, "dir", "must name the directory that holds the node identity"))
	}
	if c.CADir != "" && strings.TrimSpace(c.CADir) == "" {
		errs = append(errs, hclconf.Errorf(c.Body, "ca_dir", "is empty: name the mesh CA's directory, or remove ca_dir"))
	}
	if v := c.Vault; v != nil {
		for _, f := range []struct {
			body       hcl.Body
			name, path string
		}{{v.Body, "ca_cert", v.CACert}, {v.Auth.Body, "token_file", v.Auth.TokenFile}, {v.Auth.Body, "role_id_file", v.Auth.RoleIDFile}, {v.Auth.Body, "secret_id_file", v.Auth.SecretIDFile}} {
			if f.path != "" && strings.TrimSpace(f.path) == "" {
				errs = append(errs, hclconf.Errorf(f.body, f.name, "is empty: name the file, or remove %s", f.name))
			}
		}
	}
	if c.MeshCIDR != "" {
		p, err := netip.ParsePrefix(c.MeshCIDR)
		switch {
		case err != nil || p != p.Masked():
			errs = append(errs, hclconf.Errorf(c.Body, "mesh_cidr", "%q is not a CIDR prefix such as 100.96.0.0/16", c.MeshCIDR))
		default:
			if err := CheckMeshPrefix(p); err != nil {
				errs = append(errs, hclconf.Errorf(c.Body, "mesh_cidr", "%v", err))
			}
		}
		s.meshPrefix = p
	}
	if c.TTL == "role" && s.backend == BackendVault {
		s.ttl = 0 // the PKI role decides (a burst site's role ends every certificate at the burst's end)
	} else if c.TTL != "" {
		d, err := time.ParseDuration(c.TTL)
		switch {
		case c.TTL == "role":
			errs = append(errs, hclconf.Errorf(c.Body, "ttl", `"role" (the PKI role decides) is for the vault back end only; give a duration such as 24h`))
		case err != nil || d <= 0:
			errs = append(errs, hclconf.Errorf(c.Body, "ttl", "%q is not a positive duration such as 24h", c.TTL))
		case d < minTTL:
			// A certificate must outlive its own renewal by far.
			errs = append(errs, hclconf.Errorf(c.Body, "ttl", "%s is too short a certificate life: at least %s (hours or days in production)", d, minTTL))
		}
		s.ttl = d
	}
	if c.Refresh != "" {
		d, err := time.ParseDuration(c.Refresh)
		if err != nil || d < time.Second || d > maxRefresh {
			errs = append(errs, hclconf.Errorf(c.Body, "refresh", "%q is not a duration between 1s and %s such as 1m", c.Refresh, maxRefresh))
		}
		s.refresh = d
	}
	if v := c.Vault; v != nil {
		if v.PKIRole == "" {
			errs = append(errs, hclconf.Errorf(v.Body, "pki_role", "must name the PKI role that signs gateway certificates"))
		}
		if v.PKIMount == "" {
			v.PKIMount = "pki"
		}
		if v.KVMount == "" {
			v.KVMount = "kv"
		}
		if v.KVPrefix == "" {
			v.KVPrefix = "skybridge"
		}
		a := &v.Auth
		switch a.Method {
		case "token":
			// AppRole settings beside token would be ignored, and the
			// gateway log in with whatever token $VAULT_TOKEN holds.
			for _, f := range []struct{ name, v string }{{"role_id", a.RoleID}, {"role_id_file", a.RoleIDFile}, {"secret_id_file", a.SecretIDFile}, {"secret_id_env", a.SecretIDEnv}} {
				if f.v != "" {
					errs = append(errs, hclconf.Errorf(a.Body, f.name, "%s is for method = \"approle\"; with method = \"token\" it would be ignored: remove it, or set method = \"approle\"", f.name))
				}
			}
			if a.Wrapped {
				errs = append(errs, hclconf.Errorf(a.Body, "wrapped", "wrapped is for method = \"approle\" (a wrapped SecretID); with method = \"token\" it would be ignored"))
			}
		case "approle":
			if a.TokenFile != "" {
				errs = append(errs, hclconf.Errorf(a.Body, "token_file", "token_file is for method = \"token\"; with method = \"approle\" it would be ignored: remove it"))
			}
			if (a.RoleID == "") == (a.RoleIDFile == "") {
				errs = append(errs, hclconf.Errorf(a.Body, "role_id", "approle needs exactly one of role_id and role_id_file"))
			}
			if (a.SecretIDFile == "") == (a.SecretIDEnv == "") {
				errs = append(errs, hclconf.Errorf(a.Body, "secret_id_file", "approle needs exactly one of secret_id_file and secret_id_env"))
			}
			if a.Mount == "" {
				a.Mount = "approle"
			}
		default:
			errs = append(errs, hclconf.Errorf(a.Body, "method", "%q is not supported; use \"token\" or \"approle\"", a.Method))
		}
	}
	if err := hclconf.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

// File is a configuration file holding a node block and an identity block.
// Other blocks (those of the gateway) are left for their own decoders, so
// `skybridge identity` commands read the gateway's configuration file as is.
type File struct {
	Node     *NodeConfig `hcl:"node,block"`
	Identity Config      `hcl:"identity,block"`
	Rest     hcl.Body    `hcl:",remain"`
}

// LoadFile reads a configuration file's node and identity blocks.
func LoadFile(path string) (*File, error) {
	var f File
	if err := hclconf.DecodeFile(path, &f); err != nil {
		return nil, err
	}
	if err := f.Identity.ResolvePaths(path); err != nil {
		return nil, err
	}
	if _, err := f.Identity.validate(); err != nil {
		return nil, err
	}
	return &f, nil
}

// ResolvePaths makes the configuration's relative paths relative to the
// directory of its file, configFile: not to wherever the gateway or a
// command reading the same file was started (systemd starts in /).
func (c *Config) ResolvePaths(configFile string) error {
	base, err := filepath.Abs(filepath.Dir(configFile))
	if err != nil {
		return err
	}
	ps := []*string{&c.Dir, &c.CADir}
	if v := c.Vault; v != nil {
		ps = append(ps, &v.CACert, &v.Auth.TokenFile, &v.Auth.RoleIDFile, &v.Auth.SecretIDFile)
	}
	ResolveUnder(base, ps...)
	return nil
}

// ResolveUnder makes each relative path relative to base; a blank one is
// left for validation to refuse.
func ResolveUnder(base string, paths ...*string) {
	for _, p := range paths {
		if strings.TrimSpace(*p) != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
}

// String describes the back end choice for logs and status output.
func (c *Config) String() string {
	if c.Backend == BackendVault && c.Vault != nil {
		return fmt.Sprintf("vault %s (pki %s/%s, kv %s/%s)", c.Vault.Address, c.Vault.PKIMount, c.Vault.PKIRole, c.Vault.KVMount, c.Vault.KVPrefix)
	}
	return "file " + c.Dir
}

// meshSpace is where a mesh's overlay range may lie: private and shared
// (CGNAT) IPv4 space, and IPv6 unique local addresses. Overlay addresses
// are reached through the mesh alone, and no site network (route) may
// overlap them: public space, loopback, link-local or multicast would
// shadow addresses that mean something else.
var meshSpace = []netip.Prefix{
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("fc00::/7"),
}

// minMeshHosts is the fewest gateway addresses a mesh range must hold:
// the sites' gateways, and burst sites' (mesh.MaxBurstGateways each),
// each with an address of the range (neither its first nor its last).
const minMeshHosts = 254

// CheckMeshPrefix refuses an overlay range outside private and shared
// address space, or too small for a mesh: it becomes the netmask of
// every gateway's overlay address, and so a route on every host.
func CheckMeshPrefix(p netip.Prefix) error {
	inside := false
	for _, s := range meshSpace {
		inside = inside || s.Bits() <= p.Bits() && s.Contains(p.Addr())
	}
	if !inside {
		return fmt.Errorf("%s is not private or shared address space: give a range inside 100.64.0.0/10 (like the default, %s), 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or fc00::/7 that no site network uses", p, DefaultMeshPrefix)
	}
	if hostBits := p.Addr().BitLen() - p.Bits(); hostBits < 63 && 1<<hostBits-2 < minMeshHosts {
		widest := p.Addr().BitLen() - 8 // 256 addresses, 254 of them usable
		return fmt.Errorf("%s holds %d gateway addresses: give a range of /%d or wider, room for the sites' gateways and for burst sites'", p, max(1<<hostBits-2, 0), widest)
	}
	return nil
}
