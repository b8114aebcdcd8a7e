module github.com/f2b-shim/f2b-shim

go 1.26.8

// What the shim itself runs on.
require (
	github.com/BurntSushi/toml v1.6.0 // the policy file
	github.com/coreos/go-iptables v0.8.0 // applying changes to iptables
	github.com/google/shlex v0.0.0-20191202100458-e7afc7fbc510 // splitting SSH_ORIGINAL_COMMAND into words
	github.com/vishvananda/netlink v1.3.1 // the set backend's ipsets, over netlink, without a process per ban
	go.etcd.io/bbolt v1.4.3 // the state: crash-safe, transactional, O(log n) per change
	golang.org/x/sys v0.29.0 // netlink constants for the ipset header query
)

// Test-only.
require github.com/stretchr/testify v1.12.1

require (
	github.com/vishvananda/netns v0.0.5 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
)
