package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/ipfs/kubo/client/rpc"

	"github.com/imagemesh/imagemesh/pkg/storage/static"
)

// Root returns the layout's root now, as /ipfs/<cid>: what node agents pull from. It changes with
// every push.
func (l IPFSLayout) Root(ctx context.Context) (string, error) {
	if err := l.validate(); err != nil {
		return "", err
	}
	d, err := l.driver()
	if err != nil {
		return "", err
	}
	c, err := d.RootCID(ctx)
	if err != nil {
		return "", fmt.Errorf("ipfs: root of %s: %w", l.dir(), err)
	}
	return "/ipfs/" + c, nil
}

// Publish publishes the layout's root now under the IPNS name of kubo's key, and returns the name as
// /ipns/<name>: a root that follows the pushes, each time it is published again.
func (l IPFSLayout) Publish(ctx context.Context, key string) (string, error) {
	root, err := l.Root(ctx)
	if err != nil {
		return "", err
	}
	api, err := rpc.NewURLApiWithClient(l.API, &http.Client{})
	if err != nil {
		return "", fmt.Errorf("ipfs: kubo API %q: %w", l.API, err)
	}
	var out struct{ Name, Value string }
	if err := api.Request("name/publish", root).Option("key", key).Exec(ctx, &out); err != nil {
		return "", fmt.Errorf("ipfs: publish %s under key %q: %w", root, key, err)
	}
	return "/ipns/" + out.Name, nil
}

// Export writes the static /v2/ layout of every tag of repos (repository paths, e.g. team/app) under
// staticPrefix in the bucket, for linksharing to serve to docker pull, and returns the images it
// wrote as repo:tag. On an error, it returns those of the repositories it exported whole before.
func (l StorjLayout) Export(ctx context.Context, staticPrefix string, repos []string) ([]string, error) {
	if len(repos) == 0 {
		return nil, errors.New("export: name at least one repository")
	}
	if err := l.validate(); err != nil {
		return nil, err
	}
	d, err := l.driver(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { _ = d.Close() }() // read-only by now: nothing to lose
	e := &static.Exporter{Driver: d, Prefix: staticPrefix}
	var exported []string
	for _, repo := range repos {
		tags, err := e.ExportAll(ctx, repo)
		if err != nil {
			return exported, err
		}
		for _, t := range tags {
			exported = append(exported, repo+":"+t)
		}
	}
	return exported, nil
}
