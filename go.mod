module github.com/f2b-shim/f2b-shim

go 1.26.8

// What the shim itself runs on.
require (
	github.com/BurntSushi/toml v1.6.0 // the policy file
	github.com/coreos/go-iptables v0.8.0 // applying changes to iptables
	github.com/google/nftables v0.3.0 // the nftables backend: its own inet table over netlink, one transaction per batch, no program
	github.com/google/shlex v0.0.0-20191202100458-e7afc7fbc510 // splitting SSH_ORIGINAL_COMMAND into words
	github.com/mdlayher/netlink v1.7.3-0.20250113171957-fbb4dce95f42 // google/nftables' socket: its buffer sizes, and the test dialer of the byte-level tests
	github.com/vishvananda/netlink v1.3.1 // the set backend's ipsets, over netlink, without a process per ban
	go.etcd.io/bbolt v1.4.3 // the state: crash-safe, transactional, O(log n) per change
	golang.org/x/sys v0.49.0 // netlink constants for the ipset header query
)

// Test-only.
require github.com/stretchr/testify v1.12.1

require (
	github.com/prometheus/client_golang v1.23.2
	github.com/prometheus/common v0.73.1
)

require (
	github.com/beorn7/perks v1.0.1 // indirect
	github.com/cespare/xxhash/v2 v2.3.0 // indirect
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/mdlayher/socket v0.5.0 // indirect
	github.com/munnerz/goautoneg v0.0.0-20191010083416-a7dc8b61c822 // indirect
	github.com/pandatix/go-abnf v0.5.3 // indirect
	github.com/prometheus/client_model v0.6.3 // indirect
	github.com/prometheus/procfs v0.21.0 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/net v0.61.0 // indirect
	golang.org/x/sync v0.21.0 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)
