package hclconf

import (
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
