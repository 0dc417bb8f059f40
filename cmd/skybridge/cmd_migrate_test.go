package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/skybridge-mesh/skybridge/mesh"
	"github.com/skybridge-mesh/skybridge/migrate"
)

// TestMigrationResultNamesImage: a migration's result names the stored
// image as migrate verify and remove take it, its format apart.
func TestMigrationResultNamesImage(t *testing.T) {
	var out bytes.Buffer
	printMigrationResult(&out, &mesh.MigrationEvent{ID: "m1", Record: &migrate.SendRecord{ID: "m1", State: migrate.StateDone,
		Image: "/img/vm.raw", Name: "vm", Format: migrate.FormatQcow2, To: "gw-fra", ToSite: "aws-eu-central-1"}})
	first, _, _ := strings.Cut(out.String(), "\n")
	if want := "→ gw-fra (aws-eu-central-1) as vm, format qcow2"; !strings.HasSuffix(first, want) {
		t.Errorf("%q; want it to end %q", first, want)
	}
}
