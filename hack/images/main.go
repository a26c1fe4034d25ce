// Command images builds the OCI images of node-agent, controller and imagemesh for linux/amd64 and
// linux/arm64 (internal/imagebuild), writes them into one OCI layout, and with -registry pushes them.
// `make images` runs it; see the README.
//
// Names: <registry or the chart's image.repository>/<name>:<tag or the chart's appVersion>.
// Timestamps: $SOURCE_DATE_EPOCH, else the time of the HEAD commit.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/imagemesh/imagemesh/internal/imagebuild"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run() error {
	out := flag.String("out", "bin/images", "directory of the OCI layouts, one per image: OUT/<name>")
	registry := flag.String("registry", "", "push to REGISTRY/<name>:TAG (host[:port]/prefix); default: only the layout, named after the chart's image.repository")
	tag := flag.String("tag", "", "image tag (default: the chart's appVersion)")
	version := flag.String("version", "", "version stamped into the binaries (default: git describe --tags --always --dirty)")
	platforms := flag.String("platforms", "linux/amd64,linux/arm64", "comma-separated platforms")
	only := flag.String("images", "", "comma-separated images to build (default: all)")
	insecure := flag.Bool("insecure", false, "reach the registry over plain HTTP (automatic for localhost and loopback addresses)")
	caCerts := flag.String("ca-certs", imagebuild.CACerts, "CA certificate bundle to put into the images")
	goCmd := flag.String("go", "go", "the go command")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	repo, chartTag, err := imagebuild.ChartDefaults("charts/imagemesh")
	if err != nil {
		return err
	}
	if *registry != "" {
		repo = strings.TrimSuffix(*registry, "/")
	}
	if *tag == "" {
		*tag = chartTag
	}
	if *version == "" {
		if *version, err = git("describe", "--tags", "--always", "--dirty"); err != nil {
			return err
		}
	}
	revision, err := git("rev-parse", "HEAD")
	if err != nil {
		return err
	}
	epoch := os.Getenv("SOURCE_DATE_EPOCH")
	if epoch == "" {
		if epoch, err = git("log", "-1", "--format=%ct"); err != nil {
			return err
		}
	}
	secs, err := strconv.ParseInt(epoch, 10, 64)
	if err != nil {
		return fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", epoch, err)
	}
	opts := imagebuild.Options{Repository: repo, Tag: *tag, Version: *version, Revision: revision,
		Created: time.Unix(secs, 0), CACerts: *caCerts, Go: *goCmd}
	for _, c := range imagebuild.Commands {
		if *only == "" || contains(*only, c.Name) {
			opts.Commands = append(opts.Commands, c)
		}
	}
	for _, s := range strings.Split(*platforms, ",") {
		p, err := v1.ParsePlatform(s)
		if err != nil {
			return err
		}
		opts.Platforms = append(opts.Platforms, *p)
	}
	if opts.WorkDir, err = os.MkdirTemp("", "imagemesh-images-"); err != nil {
		return err
	}
	defer func() {
		if err := os.RemoveAll(opts.WorkDir); err != nil {
			fmt.Fprintln(os.Stderr, "images: remove work dir:", err)
		}
	}()

	images, err := imagebuild.Build(ctx, opts)
	if err != nil {
		return err
	}
	if err := imagebuild.WriteLayout(*out, images); err != nil {
		return err
	}
	if *registry != "" {
		if err := imagebuild.Push(ctx, images, *insecure); err != nil {
			return err
		}
		fmt.Printf("pushed to %s; OCI layouts in %s/<name>\n", repo, *out)
	} else {
		fmt.Printf("OCI layouts in %s/<name>\n", *out)
	}
	return imagebuild.Report(os.Stdout, images)
}

func git(args ...string) (string, error) {
	out, err := exec.Command("git", args...).Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(out)), nil
}

func contains(list, s string) bool {
	for _, x := range strings.Split(list, ",") {
		if strings.TrimSpace(x) == s {
			return true
		}
	}
	return false
}
