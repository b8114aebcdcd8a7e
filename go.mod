module github.com/f2b-shim/f2b-shim

go 1.26.8

require (
	github.com/BurntSushi/toml v1.6.0
	github.com/google/shlex v0.0.0-20191202100458-e7afc7fbc510
	github.com/stretchr/testify v1.12.1
)

require (
	github.com/coreos/go-iptables v0.8.0 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
)
