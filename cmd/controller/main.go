// Command controller runs the imagemesh controller manager: it reconciles ImageSources into the mirror
// configuration that every node agent applies.
package main

import (
	"context"
	goflag "flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/imagemesh/imagemesh/internal/controller"
)

// Options are the controller's settings.
type Options struct {
	Namespace     string
	ConfigMapName string
	MetricsAddr   string
	ProbeAddr     string
	LeaderElect   bool
	Kubeconfig    string
}

func main() {
	if err := newCommand().ExecuteContext(ctrl.SetupSignalHandler()); err != nil {
		fmt.Fprintln(os.Stderr, "controller:", err)
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	opts := Options{Namespace: os.Getenv("POD_NAMESPACE"), ConfigMapName: "imagemesh-mirrors", MetricsAddr: ":8080", ProbeAddr: ":8081"}
	if opts.Namespace == "" {
		opts.Namespace = "imagemesh-system"
	}
	zapOpts := zap.Options{}
	cmd := &cobra.Command{
		Use:          "controller",
		Short:        "Reconcile ImageSources into the mirror configuration of the node agents",
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
			return Run(cmd.Context(), opts)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Namespace, "namespace", opts.Namespace, "namespace of the referenced Secrets, the published ConfigMap and the agents' Leases (default $POD_NAMESPACE)")
	f.StringVar(&opts.ConfigMapName, "configmap", opts.ConfigMapName, "name of the ConfigMap the agents read")
	f.StringVar(&opts.MetricsAddr, "metrics-bind-address", opts.MetricsAddr, "address of /metrics (0 disables)")
	f.StringVar(&opts.ProbeAddr, "health-probe-bind-address", opts.ProbeAddr, "address of /healthz and /readyz")
	f.BoolVar(&opts.LeaderElect, "leader-elect", opts.LeaderElect, "elect a leader, so that replicas do not reconcile at once")
	f.StringVar(&opts.Kubeconfig, "kubeconfig", "", "kubeconfig outside the cluster (default: the pod's service account)")
	// controller-runtime's logging flags (--zap-log-level, --zap-devel, ...), which the chart sets.
	zapFlags := goflag.NewFlagSet("zap", goflag.ContinueOnError)
	zapOpts.BindFlags(zapFlags)
	f.AddGoFlagSet(zapFlags)
	return cmd
}

// Run runs the manager until ctx ends.
func Run(ctx context.Context, opts Options) error {
	cfg, err := restConfig(opts.Kubeconfig)
	if err != nil {
		return err
	}
	// Secrets, ConfigMaps and Leases are cached for the controller's namespace only: reading every
	// Secret of the cluster is neither needed nor granted.
	nsOnly := cache.ByObject{Namespaces: map[string]cache.Config{opts.Namespace: {}}}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  controller.NewScheme(),
		Metrics:                 metricsserver.Options{BindAddress: opts.MetricsAddr},
		HealthProbeBindAddress:  opts.ProbeAddr,
		LeaderElection:          opts.LeaderElect,
		LeaderElectionID:        "imagemesh-controller",
		LeaderElectionNamespace: opts.Namespace,
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Secret{}: nsOnly, &corev1.ConfigMap{}: nsOnly, &coordinationv1.Lease{}: nsOnly,
		}},
	})
	if err != nil {
		return fmt.Errorf("manager: %w", err)
	}
	r := &controller.ImageSourceReconciler{
		Client:        mgr.GetClient(),
		Namespace:     opts.Namespace,
		ConfigMapName: opts.ConfigMapName,
		Recorder:      mgr.GetEventRecorderFor("imagemesh-controller"),
		Probe:         controller.HTTPProbe(&http.Client{Timeout: 5 * time.Second}),
		StorjProbe:    controller.UplinkProbe,
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return err
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return err
	}
	return mgr.Start(ctx)
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	return ctrl.GetConfig()
}
