package vault

import (
	_ "github.com/hashicorp/vault/builtin/credential/approle"
	_ "github.com/hashicorp/vault/builtin/logical/pki"
	_ "github.com/hashicorp/vault/http"
	_ "github.com/hashicorp/vault/vault"
)
