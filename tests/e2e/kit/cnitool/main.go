// cnitool: run a CNI network list by hand, as containernetworking/cni's cnitool does.
//
// Built by tests/e2e (kit/cnitool.py) with Debian's Go against libcni from
// golang-github-containernetworking-cni-dev (Debian: golang-github-appc-cni-dev 1.1.2),
// in GOPATH mode and offline. Debian ships libcni but not cnitool's main, so
// this file is the command: the same interface and environment as upstream's
//
//	cnitool add|check|del NETWORK NETNS
//	cnitool gc|status NETWORK [NETNS]
//
//	NETCONFPATH   directory of network configurations (default /etc/cni/net.d)
//	CNI_PATH      plugin directories, ':'-separated
//	CNI_ARGS      "K=V;K=V" plugin arguments
//	CAP_ARGS      JSON object of capability arguments ({"portMappings": [...]})
//	CNI_IFNAME    interface name (default eth0)
//	CNI_CONTAINERID  container ID (default: a hash of the netns path, like upstream)
//	CNI_CACHE_DIR results cache (default /var/lib/cni, libcni's)
//
// libcni 1.1.2 predates spec 1.1.0's GC and STATUS, so they are written here
// after libcni 1.2's GCNetworkList / GetStatusNetworkList: gc DELs every cached
// attachment of the network (cnitool passes no valid attachments), then, for
// cniVersion >= 1.1.0, sends GC to each plugin with an empty
// "cni.dev/valid-attachments"; status sends STATUS to each plugin for
// cniVersion >= 1.1.0. Both do nothing more for older versions, as libcni does.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

func usage() {
	exe := filepath.Base(os.Args[0])
	fmt.Fprintf(os.Stderr, "%s: Add, check, remove, garbage-collect or query network interfaces from a network namespace\n", exe)
	fmt.Fprintf(os.Stderr, "  %s add|check|del <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s gc|status <net> [<netns>]\n", exe)
	os.Exit(1)
}

func exit(err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func parseArgs(text string) ([][2]string, error) {
	var out [][2]string
	if text == "" {
		return out, nil
	}
	for _, pair := range strings.Split(text, ";") {
		kv := strings.SplitN(pair, "=", 2)
		if len(kv) != 2 || kv[0] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out, nil
}

// cached is the part of libcni's cache record (cniCacheV1) that GC needs.
type cached struct {
	Kind           string                 `json:"kind"`
	ContainerID    string                 `json:"containerId"`
	IfName         string                 `json:"ifName"`
	NetworkName    string                 `json:"networkName"`
	CniArgs        [][2]string            `json:"cniArgs,omitempty"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs,omitempty"`
	Result         map[string]interface{} `json:"result,omitempty"`
}

func cachedAttachments(cacheDir, network string) ([]cached, error) {
	dir := filepath.Join(cacheDir, "results")
	entries, err := ioutil.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var out []cached
	for _, entry := range entries {
		data, err := ioutil.ReadFile(filepath.Join(dir, entry.Name()))
		if err != nil {
			continue
		}
		var c cached
		if json.Unmarshal(data, &c) != nil || c.Kind != libcni.CNICacheV1 || c.NetworkName != network {
			continue
		}
		out = append(out, c)
	}
	return out, nil
}

func atLeast110(list *libcni.NetworkConfigList) bool {
	ok, err := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0")
	return err == nil && ok
}

// execEach runs command on every plugin of the list (in reverse for DEL), the
// config injected the way libcni does (name, cniVersion, extra keys).
func execEach(ctx context.Context, paths []string, list *libcni.NetworkConfigList, command string,
	rt *libcni.RuntimeConf, extra map[string]interface{}) error {
	plugins := list.Plugins
	if command == "DEL" {
		plugins = make([]*libcni.NetworkConfig, 0, len(list.Plugins))
		for i := len(list.Plugins) - 1; i >= 0; i-- {
			plugins = append(plugins, list.Plugins[i])
		}
	}
	for _, plugin := range plugins {
		inject := map[string]interface{}{"name": list.Name, "cniVersion": list.CNIVersion}
		for k, v := range extra {
			inject[k] = v
		}
		conf, err := libcni.InjectConf(plugin, inject)
		if err != nil {
			return err
		}
		path, err := invoke.FindInPath(plugin.Network.Type, paths)
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: command, ContainerID: rt.ContainerID, NetNS: rt.NetNS,
			PluginArgs: rt.Args, IfName: rt.IfName, Path: strings.Join(paths, string(os.PathListSeparator))}
		if err := invoke.ExecPluginWithoutResult(ctx, path, conf.Bytes, args, nil); err != nil {
			return fmt.Errorf("plugin %s: %w", plugin.Network.Type, err)
		}
	}
	return nil
}

func gc(ctx context.Context, cninet *libcni.CNIConfig, paths []string, list *libcni.NetworkConfigList, cacheDir string) error {
	attachments, err := cachedAttachments(cacheDir, list.Name)
	if err != nil {
		return err
	}
	var errs []string
	for _, a := range attachments {
		rt := &libcni.RuntimeConf{ContainerID: a.ContainerID, IfName: a.IfName, Args: a.CniArgs,
			CapabilityArgs: a.CapabilityArgs}
		if !atLeast110(list) {
			err = cninet.DelNetworkList(ctx, list, rt)
		} else {
			// libcni 1.1.2 cannot convert results to 1.1.0 (same shape as 1.0.0): pass the cached one.
			prev := a.Result
			if prev != nil {
				prev["cniVersion"] = list.CNIVersion
			}
			err = execEach(ctx, paths, list, "DEL", rt, map[string]interface{}{"prevResult": prev})
			if err == nil {
				err = os.Remove(filepath.Join(cacheDir, "results", fmt.Sprintf("%s-%s-%s", list.Name, a.ContainerID, a.IfName)))
			}
		}
		if err != nil {
			errs = append(errs, fmt.Sprintf("DEL %s/%s: %v", a.ContainerID, a.IfName, err))
		}
	}
	if atLeast110(list) {
		valid := map[string]interface{}{"cni.dev/valid-attachments": []interface{}{}}
		if err := execEach(ctx, paths, list, "GC", &libcni.RuntimeConf{}, valid); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("gc: %s", strings.Join(errs, "; "))
	}
	return nil
}

func main() {
	if len(os.Args) < 3 {
		usage()
	}
	command := os.Args[1]
	netdir := envOr("NETCONFPATH", "/etc/cni/net.d")
	list, err := libcni.LoadConfList(netdir, os.Args[2])
	if err != nil {
		exit(err)
	}
	var capabilityArgs map[string]interface{}
	if text := os.Getenv("CAP_ARGS"); text != "" {
		if err := json.Unmarshal([]byte(text), &capabilityArgs); err != nil {
			exit(fmt.Errorf("CAP_ARGS: %w", err))
		}
	}
	cniArgs, err := parseArgs(os.Getenv("CNI_ARGS"))
	if err != nil {
		exit(err)
	}
	paths := filepath.SplitList(os.Getenv("CNI_PATH"))
	cacheDir := envOr("CNI_CACHE_DIR", libcni.CacheDir)
	cninet := libcni.NewCNIConfigWithCacheDir(paths, cacheDir, nil)
	ctx := context.TODO()

	switch command {
	case "gc":
		exit(gc(ctx, cninet, paths, list, cacheDir))
	case "status":
		if !atLeast110(list) {
			exit(nil)
		}
		exit(execEach(ctx, paths, list, "STATUS", &libcni.RuntimeConf{}, nil))
	case "add", "check", "del":
	default:
		usage()
	}
	if len(os.Args) < 4 {
		usage()
	}
	netns, err := filepath.Abs(os.Args[3])
	if err != nil {
		exit(err)
	}
	sum := sha512.Sum512([]byte(netns))
	rt := &libcni.RuntimeConf{
		ContainerID:    envOr("CNI_CONTAINERID", fmt.Sprintf("%x", sum)[:64]),
		NetNS:          netns,
		IfName:         envOr("CNI_IFNAME", "eth0"),
		Args:           cniArgs,
		CapabilityArgs: capabilityArgs,
	}
	switch command {
	case "add":
		result, err := cninet.AddNetworkList(ctx, list, rt)
		if result != nil {
			_ = result.Print()
		}
		exit(err)
	case "check":
		exit(cninet.CheckNetworkList(ctx, list, rt))
	case "del":
		exit(cninet.DelNetworkList(ctx, list, rt))
	}
}
