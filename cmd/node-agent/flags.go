package main

import (
	"github.com/spf13/pflag"

	"github.com/imagemesh/imagemesh/internal/agent"
)

type pflagFlag = pflag.Flag

// applyFlag copies one flag that was set on the command line from the flag values into the config
// loaded from defaults and file.
func applyFlag(dst, flags *agent.Config, name string) {
	switch name {
	case "listen":
		dst.Listen = flags.Listen
	case "metrics-listen":
		dst.MetricsListen = flags.MetricsListen
	case "data-dir":
		dst.DataDir = flags.DataDir
	case "cache-max-bytes":
		dst.Cache.MaxBytes = flags.Cache.MaxBytes
	case "default-registry":
		dst.DefaultRegistry = flags.DefaultRegistry
	case "registry":
		dst.Registries = flags.Registries
	case "tag-ttl":
		dst.TagTTL = flags.TagTTL
	case "hosts-dir":
		dst.HostConfig.Dir = flags.HostConfig.Dir
	case "mirror-registry":
		dst.HostConfig.Registries = flags.HostConfig.Registries
	case "mirror-url":
		dst.HostConfig.MirrorURL = flags.HostConfig.MirrorURL
	case "log-level":
		dst.Log.Level = flags.Log.Level
	case "log-format":
		dst.Log.Format = flags.Log.Format
	case "shutdown-timeout":
		dst.ShutdownTimeout = flags.ShutdownTimeout
	}
}
