// Command validate checks Kubernetes manifests the way the API server's decoder reads
// them: every document is decoded strictly into its API type from k8s.io/api (an
// unknown or misspelled field, a wrong type or a duplicate key is an error), and then
// checked for what the outbox relay needs of its deployment: two replicas or more,
// liveness and readiness probes on /healthz, a PodDisruptionBudget whose selector
// matches the Deployment's pods, a non-root user, and a config file the relay can
// read (the ConfigMap's outbox.toml is written out with -config-out for the relay's own
// loader to check).
//
//	go run ./deploy/kubernetes/validate [-config-out FILE] deploy/kubernetes/*.yaml
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

func main() {
	configOut := flag.String("config-out", "", "write the ConfigMap's outbox.toml here")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: validate [-config-out FILE] MANIFEST.yaml...")
		os.Exit(2)
	}
	var objects []runtime.Object
	failed := false
	for _, path := range flag.Args() {
		decoded, err := decodeFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		objects = append(objects, decoded...)
	}
	if failed {
		os.Exit(1)
	}
	problems, config := check(objects)
	for _, problem := range problems {
		fmt.Fprintln(os.Stderr, "problem:", problem)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
	if *configOut != "" {
		if err := os.WriteFile(*configOut, []byte(config), 0o600); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	fmt.Printf("validate: %d objects decoded strictly and checked\n", len(objects))
}

// decodeFile decodes every YAML document of path strictly into its API type.
func decodeFile(path string) ([]runtime.Object, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	reader := utilyaml.NewYAMLReader(bufio.NewReader(file))
	var objects []runtime.Object
	for n := 1; ; n++ {
		document, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		if len(bytes.TrimSpace(stripComments(document))) == 0 {
			continue
		}
		object, kind, err := decoder.Decode(document, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		if kind.Kind == "" {
			return nil, fmt.Errorf("document %d has no kind", n)
		}
		objects = append(objects, object)
	}
	if len(objects) == 0 {
		return nil, errors.New("no Kubernetes object in the file")
	}
	return objects, nil
}

func stripComments(document []byte) []byte {
	var kept [][]byte
	for _, line := range bytes.Split(document, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			kept = append(kept, line)
		}
	}
	return bytes.Join(kept, []byte("\n"))
}

// check returns what is wrong with the relay's deployment, and its outbox.toml.
func check(objects []runtime.Object) ([]string, string) {
	var problems []string
	var deployments []*appsv1.Deployment
	var budgets []*policyv1.PodDisruptionBudget
	configs := map[string]*corev1.ConfigMap{}
	for _, object := range objects {
		switch o := object.(type) {
		case *appsv1.Deployment:
			deployments = append(deployments, o)
		case *policyv1.PodDisruptionBudget:
			budgets = append(budgets, o)
		case *corev1.ConfigMap:
			configs[o.Name] = o
		}
	}
	if len(deployments) != 1 {
		return []string{fmt.Sprintf("expected one Deployment, found %d", len(deployments))}, ""
	}
	d := deployments[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		problems = append(problems, "the Deployment needs at least 2 replicas, so a standby can take over")
	}
	pod := d.Spec.Template
	selector, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || !selector.Matches(labels.Set(pod.Labels)) {
		problems = append(problems, "the Deployment's selector does not match its pod template")
	}
	security := pod.Spec.SecurityContext
	if security == nil || security.RunAsNonRoot == nil || !*security.RunAsNonRoot {
		problems = append(problems, "the pod must set runAsNonRoot: true")
	}
	config := ""
	for _, c := range pod.Spec.Containers {
		for name, probe := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
			if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != "/healthz" {
				problems = append(problems, fmt.Sprintf("container %s: the %s probe must GET /healthz", c.Name, name))
			}
		}
		if c.SecurityContext == nil || c.SecurityContext.ReadOnlyRootFilesystem == nil || !*c.SecurityContext.ReadOnlyRootFilesystem {
			problems = append(problems, fmt.Sprintf("container %s: the root filesystem should be read-only", c.Name))
		}
	}
	for _, volume := range pod.Spec.Volumes {
		if volume.ConfigMap == nil {
			continue
		}
		c, ok := configs[volume.ConfigMap.Name]
		if !ok {
			problems = append(problems, fmt.Sprintf("volume %s names the ConfigMap %s, which is not in the manifests", volume.Name, volume.ConfigMap.Name))
			continue
		}
		config = c.Data["outbox.toml"]
	}
	if config == "" {
		problems = append(problems, "no ConfigMap with an outbox.toml is mounted")
	}
	covered := false
	for _, b := range budgets {
		s, err := metav1.LabelSelectorAsSelector(b.Spec.Selector)
		if err == nil && s.Matches(labels.Set(pod.Labels)) {
			covered = true
		}
	}
	if !covered {
		problems = append(problems, "no PodDisruptionBudget selects the relay's pods")
	}
	return problems, config
}
