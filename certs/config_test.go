package certs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigBlankPathsRefused: a path of blanks is not made absolute
// (ResolvePaths leaves it for validation to refuse), so taken it would
// name a file under whatever directory the gateway was started in.
func TestConfigBlankPathsRefused(t *testing.T) {
	for _, tc := range []struct{ identity, want string }{
		{`dir = " "`, ":2:3: dir: must name the directory"},
		{"dir = \"/x\"\n  ca_dir = \"\\t\"", ":3:3: ca_dir: is empty"},
		{"dir = \"/x\"\n  backend = \"vault\"\n  vault {\n    pki_role = \"gw\"\n    ca_cert = \" \"\n    auth {\n      method = \"token\"\n    }\n  }", ":6:5: ca_cert: is empty"},
		{"dir = \"/x\"\n  backend = \"vault\"\n  vault {\n    pki_role = \"gw\"\n    auth {\n      method = \"token\"\n      token_file = \" \"\n    }\n  }", ":8:7: token_file: is empty"},
		{"dir = \"/x\"\n  backend = \"vault\"\n  vault {\n    pki_role = \"gw\"\n    auth {\n      method = \"approle\"\n      role_id_file = \" \"\n      secret_id_file = \" \"\n    }\n  }", ":8:7: role_id_file: is empty"},
		{"dir = \"/x\"\n  backend = \"vault\"\n  vault {\n    pki_role = \"gw\"\n    auth {\n      method = \"approle\"\n      role_id = \"r\"\n      secret_id_file = \" \"\n    }\n  }", ":9:7: secret_id_file: is empty"},
	} {
		path := filepath.Join(t.TempDir(), "gateway.hcl")
		os.WriteFile(path, []byte("identity {\n  "+tc.identity+"\n}\n"), 0o644)
		if _, err := LoadFile(path); err == nil || !strings.Contains(err.Error(), path+tc.want) {
			t.Errorf("%s: %v; want %q", tc.identity, err, tc.want)
		}
	}
}
