package hclconf

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
)

type block struct {
	Name string   `hcl:"name"`
	Port int      `hcl:"port,optional"`
	Body hcl.Body `hcl:",body"`
}

type file struct {
	Gateway block `hcl:"gateway,block"`
}

func TestErrorsCarryPositions(t *testing.T) {
	for _, tc := range []struct{ src, want string }{
		{"gateway {\n  name = \"a\"\n  port = \"x\"\n}\n", "gw.hcl:3:11: Unsuitable value type"},
		{"gateway {\n  name = \"a\"\n  colour = 1\n}\n", "gw.hcl:3:3: Unsupported argument"},
		{"gateway {\n  port = 1\n}\n", "gw.hcl:1:9: Missing required argument"},
		{"gateway {\n  name = \n", "gw.hcl:2:"},
	} {
		var f file
		err := Decode("gw.hcl", []byte(tc.src), &f)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) = %v, want %q", tc.src, err, tc.want)
		}
	}

	var f file
	if err := Decode("gw.hcl", []byte("gateway {\n  name = \"a\"\n  port = 70000\n}\n"), &f); err != nil {
		t.Fatal(err)
	}
	if err := Errorf(f.Gateway.Body, "port", "%d is not a port", f.Gateway.Port); err.Error() != "gw.hcl:3:3: port: 70000 is not a port" {
		t.Errorf("Errorf = %q", err)
	}
	if err := Errorf(f.Gateway.Body, "missing", "needed"); !strings.HasPrefix(err.Error(), "gw.hcl:1: missing: needed") {
		t.Errorf("Errorf for an absent attribute = %q", err)
	}
	if Join(nil, nil) != nil {
		t.Error("Join of no errors is not nil")
	}
}

// TestDuplicateKeys: a key given twice in one object is refused with its
// position, however it is written; keys given once, in any object, pass.
func TestDuplicateKeys(t *testing.T) {
	type labelled struct {
		Labels map[string]string `hcl:"labels,optional"`
	}
	for src, want := range map[string]string{
		"labels = { classes = \"pii-eu\", classes = \"swiss-banking-secret\" }\n": `gw.hcl:1:32: key "classes" given twice in this object`,
		"labels = {\n  tier = \"a\"\n  \"tier\" = \"b\"\n}\n":                     `gw.hcl:3:3: key "tier" given twice`,
		"labels = { 1 = \"a\", \"1\" = \"b\" }\n":                                 `gw.hcl:1:21: key "1" given twice`,
		"labels = { 1 = \"a\", 1.0 = \"b\" }\n":                                   `gw.hcl:1:21: key "1" given twice`,
		"labels = { a = \"x\", b = \"x\" }\n":                                     "",
	} {
		path := filepath.Join(t.TempDir(), "gw.hcl")
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		var v labelled
		err := DecodeFile(path, &v)
		if want == "" {
			if err != nil || v.Labels["a"] != "x" || v.Labels["b"] != "x" {
				t.Errorf("Decode(%q) = %v, %v", src, v.Labels, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Decode(%q) = %v, want %q", src, err, want)
		}
		// Decode (a policy's) reads it as HCL does.
		if err := Decode("gw.hcl", []byte(src), &v); err != nil {
			t.Errorf("Decode(%q) = %v; want it read", src, err)
		}
	}
}
