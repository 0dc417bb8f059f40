// Package certs is the mesh's identity: who may join, and how every gateway
// proves who it is.
//
// The mesh CA (embedded and file-backed by default, HashiCorp Vault PKI in
// production) signs one X.509 certificate per gateway. The certificate binds
// the gateway's node name, site, region, provider, jurisdiction, overlay IP,
// routed prefixes and site labels (see Attributes). A gateway gossips a
// compact signed advertisement (Advert) about itself; VerifyAdvert accepts it
// only if it is signed by the key of a certificate that chains to the CA, is
// valid now, is not revoked, grants every attribute the advert claims, and is
// newer than the last advert seen from that node.
//
// Secret material has its own types (WGPrivateKey, GossipKeyring,
// NodeIdentity, CA) that never print or log their private halves.
package certs
