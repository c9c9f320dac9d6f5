#!/usr/bin/env python3
"""The container image's build stage, run here without a container engine.

    scripts/image-build-check.py [--keep]

This machine has no Docker, Podman or BuildKit, and no registry to pull the
base images from, so `docker build` cannot run. What can run is the
Dockerfile's build stage itself: this script reads the Dockerfile, copies the
build context as `.dockerignore` trims it, and runs the stage's instructions
(ARG, ENV, SHELL, WORKDIR, COPY, RUN) in order, in a scratch directory that
stands for the stage's root filesystem. Then it checks the binary the final
stage would copy (`COPY --from=build ...`) the way that stage uses it:

- it runs on the runtime base, distroless/static or scratch, which has no
  libc: it is static (no ELF interpreter, no shared library);
- the final stage copies it to the path its ENTRYPOINT runs, and has a
  non-root USER;
- the final stage's ENTRYPOINT + CMD run it, with that stage's ENV, as its
  USER (65532; when the script runs as root, else as the caller), the files
  the command names (config, certificate, key) read-only at those paths
  under the scratch directory, the ports moved; it serves `/mutate` and
  rewrites a pod. Run as root, the script runs it chrooted into a
  read-only root that holds only what distroless/static does (passwd,
  group, nsswitch.conf, CA certificates, /tmp) besides the binary and those
  files, so it can lean on no library or file of this machine's;
- under strace (every file syscall), it opens no file for writing and
  creates, removes, renames or changes none (the manifests mount the root
  filesystem read-only).

Not the image, so not covered: the base images themselves (`rust:*-slim`:
the build runs with this machine's toolchain, printed beside the image's
RUST_VERSION; distroless: the root above is made here, from what its image
is documented to hold) and the final layers; a RUN that installs
Debian packages is not run (it would install them on this machine): the
script checks that they are installed instead. Exits non-zero, saying why,
on the first failure.
"""

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def fail(message):
    print(f"image-build-check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def instructions(text):
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation
    lines joined and comment lines dropped, as Docker reads them."""
    result = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    if pending:
        fail("the Dockerfile ends inside a continued line")
    return result


def assignments(keyword, arguments):
    """The (name, value) pairs of an ARG (`NAME[=default]`, value None
    without a default) or an ENV (`NAME=value ...`, shell-quoted)."""
    if keyword == "ARG":
        name, has_default, default = arguments.partition("=")
        return [(name, default if has_default else None)]
    return [pair.partition("=")[::2] for pair in shlex.split(arguments)]


def stages(all_instructions):
    """Splits the instructions at each FROM: the ARG defaults declared before
    the first FROM, and [(from_arguments, [instructions])]."""
    global_args = {}
    result = []
    for keyword, arguments in all_instructions:
        if keyword == "FROM":
            result.append((arguments, []))
        elif result:
            result[-1][1].append((keyword, arguments))
        elif keyword == "ARG":
            global_args.update(assignments(keyword, arguments))
    return global_args, result


def build_environment():
    """What the stage's RUNs see of this machine's environment: where the
    toolchain and the crate cache are, and how to reach the registry. Not
    RUSTFLAGS, a wrapper, a target directory or profile settings, which the
    image's build does not have."""
    kept = {"PATH", "HOME", "RUSTUP_HOME", "CARGO_HOME", "TMPDIR", "LANG", "SSL_CERT_FILE", "SSL_CERT_DIR"}
    registry = ("CARGO_REGISTRIES_", "CARGO_REGISTRY_", "CARGO_HTTP_", "CARGO_NET_", "CARGO_SOURCE_")
    return {
        name: value for name, value in os.environ.items()
        if name in kept or name.lower().endswith("_proxy") or name.startswith(registry)
    }


def ignore_patterns():
    """`.dockerignore` as compiled (exclude?, regex) pairs, later lines winning."""
    patterns = []
    path = REPO / ".dockerignore"
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        # Docker's matching: `**` spans directories, `*` and `?` do not.
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((exclude, re.compile(regex + r"\Z")))
    return patterns


def ignored(relative, patterns):
    """Whether a context path is left out: a pattern that matches the path or
    one of its parent directories excludes it, the last matching line wins."""
    parts = relative.split("/")
    verdict = False
    for exclude, regex in patterns:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = exclude
    return verdict


def copy_context(destination):
    patterns = ignore_patterns()
    count = 0
    for directory, subdirectories, files in os.walk(REPO):
        relative_dir = os.path.relpath(directory, REPO)
        prefix = "" if relative_dir == "." else relative_dir + "/"
        subdirectories[:] = [d for d in subdirectories if not ignored(prefix + d, patterns)]
        for name in files:
            relative = prefix + name
            if ignored(relative, patterns):
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, target)
            count += 1
    return count


def packages_installed(run):
    """The Debian packages a RUN installs, or None when it installs none.
    Only a RUN that does nothing else can be left out, so that no other step
    is skipped with it."""
    steps = [step.strip() for step in run.split("&&")]
    install = next((step for step in steps if step.startswith("apt-get install")), None)
    if install is None:
        return None
    others = [step for step in steps if not step.startswith(
        ("apt-get update", "apt-get install", "rm -rf /var/lib/apt/lists"))]
    if others:
        fail(f"a RUN that installs Debian packages also runs {others}: not supported")
    return [word for word in install.split()[2:] if not word.startswith("-")]


def debian_package_installed(name):
    status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return "install ok installed" in status.stdout


class Stage:
    """Runs one stage's instructions with `root` standing for `/`."""

    def __init__(self, root, context, top_level_names, global_args):
        self.root = root
        self.context = context
        self.shell = ["/bin/sh", "-c"]
        self.global_args = global_args
        self.env = build_environment()
        self.workdir = root
        # Absolute paths the stage creates (`/src`, `/out`, `/rust-target`)
        # are mapped under `root`; the host's own (`/bin/bash`) are not.
        names = "|".join(re.escape(name) for name in sorted(top_level_names))
        self.mapped = re.compile(rf"(?<![\w./$-])/(?:{names})(?![\w.-])") if names else None

    def map_paths(self, command):
        if self.mapped is None:
            return command
        return self.mapped.sub(lambda match: str(self.root) + match.group(0), command)

    def host_path(self, path):
        path = self.substitute(path)
        if path.startswith("/"):
            return self.root / path.lstrip("/")
        return self.workdir / path

    def substitute(self, text):
        return re.sub(
            r"\$\{?(\w+)\}?",
            lambda match: self.env.get(match.group(1), ""),
            text,
        )

    def run(self, keyword, arguments):
        if keyword == "ARG":
            # A stage's ARG without a default takes the one declared before
            # the first FROM; platform ARGs (TARGETARCH) are set beforehand.
            [(name, default)] = assignments(keyword, arguments)
            if default is None:
                default = self.global_args.get(name)
            if default is not None:
                self.env[name] = default
            print(f"ARG {name}={self.env.get(name, '')}")
        elif keyword == "ENV":
            for name, value in assignments(keyword, arguments):
                self.env[name] = self.substitute(value)
                print(f"ENV {name}={self.env[name]}")
        elif keyword == "SHELL":
            self.shell = json.loads(arguments)
        elif keyword == "WORKDIR":
            self.workdir = self.host_path(arguments)
            self.workdir.mkdir(parents=True, exist_ok=True)
            print(f"WORKDIR {arguments}")
        elif keyword == "COPY":
            words = shlex.split(arguments)
            if any(word.startswith("--") for word in words):
                fail(f"COPY with flags in the build stage is not supported: {arguments}")
            *sources, destination = words
            target = self.host_path(destination)
            if destination.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                origin = self.context / source
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True, symlinks=True)
                elif target.is_dir():
                    shutil.copy2(origin, target / origin.name)
                else:
                    shutil.copy2(origin, target)
            print(f"COPY {arguments}")
        elif keyword == "RUN":
            packages = packages_installed(self.substitute(arguments).replace('"', ""))
            if packages is not None:
                for name in packages:
                    if not debian_package_installed(name):
                        fail(f"the Dockerfile installs {name}; install it here: apt-get install {name}")
                print(f"RUN (not run: installs Debian packages; installed here: {' '.join(packages)})")
                return
            command = self.map_paths(arguments)
            print(f"RUN {arguments[:100]}{'...' if len(arguments) > 100 else ''}", flush=True)
            started = time.monotonic()
            result = subprocess.run(self.shell + [command], cwd=self.workdir, env=self.env)
            if result.returncode != 0:
                fail(f"RUN exited {result.returncode}: {arguments}")
            print(f"    ({time.monotonic() - started:.0f} s)")
        else:
            fail(f"{keyword} in the build stage is not supported by this check")


def elf_needs(path):
    """The ELF file's interpreter (None when static) and the libraries it
    names (NEEDED)."""
    def readelf(option):
        return subprocess.run(["readelf", option, str(path)], capture_output=True, text=True, check=True).stdout
    headers = readelf("-lW")
    if "Program Headers" not in headers:
        fail(f"{path} is not an ELF executable")
    interpreter = re.search(r"Requesting program interpreter: ([^\]]+)\]", headers)
    needed = set(re.findall(r"\(NEEDED\).*\[([^\]]+)\]", readelf("-dW")))
    return (interpreter.group(1) if interpreter else None), needed


def check_runs_on(runtime_from, binary):
    """Fails unless the runtime base image has what the binary needs: a base
    with no libc (the one tests/manifests.rs allows), so a static binary."""
    image = runtime_from.split()[0]
    if not (image.startswith("gcr.io/distroless/static") or image == "scratch"):
        fail(f"runtime base {image}: this check knows distroless/static and scratch")
    interpreter, needed = elf_needs(binary)
    if interpreter or needed:
        fail(f"the binary is dynamic ({interpreter}, {sorted(needed)}); {image} has no libc")
    return f"static executable, as {image} needs"


def signal_each(pids, number):
    for pid in pids:
        try:
            os.kill(int(pid), number)
        except ProcessLookupError:
            pass  # already gone: its exit status says why


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Syscalls that change the filesystem; opens are judged by their flags.
CHANGING_CALLS = {
    "creat", "mkdir", "mkdirat", "rmdir", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "link", "linkat", "symlink", "symlinkat", "mknod",
    "mknodat", "truncate", "ftruncate", "chmod", "fchmodat", "fchmodat2",
    "chown", "lchown", "fchownat", "utime", "utimes", "utimensat",
    "setxattr", "lsetxattr", "removexattr", "lremovexattr",
}


def filesystem_writes(trace):
    """The strace lines that open a file for writing or change the
    filesystem, attempts that failed included; /dev, /proc and /sys are not
    the root filesystem."""
    writes = []
    for line in trace.splitlines():
        call = re.match(r"\d+\s+(\w+)\((.*)", line)
        if call is None:
            continue
        name, arguments = call.groups()
        paths = re.findall(r'"([^"]*)"', arguments)
        if paths and all(re.match(r"/(dev|proc|sys)(/|$)", path) for path in paths):
            continue
        opens_for_writing = name.startswith("open") and re.search(
            r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", arguments
        )
        if opens_for_writing or name in CHANGING_CALLS:
            writes.append(line)
    return writes


def image_command(runtime, files):
    """The final stage's ENTRYPOINT + CMD arguments, with the absolute paths
    in them moved under `files` (where the script puts what the manifests
    mount there)."""
    entrypoint = next((json.loads(a) for k, a in reversed(runtime) if k == "ENTRYPOINT"), [])
    command = next((json.loads(a) for k, a in reversed(runtime) if k == "CMD"), [])
    arguments = (entrypoint + command)[1:]
    return [str(files) + argument if argument.startswith("/") else argument for argument in arguments]


# What distroless/static holds besides the binary: a passwd and group entry
# for its users, nsswitch.conf, CA certificates and /tmp. No libc, no shell.
# The lines of its nsswitch.conf that matter here: users through `compat`,
# which a static glibc binary cannot load (so it finds none), and hosts from
# its built-in `files` and `dns`.
DISTROLESS_NSSWITCH = "passwd: compat\ngroup: compat\nhosts: files dns\n"


def distroless_static_root(root, binary, entrypoint_path):
    """A root filesystem with what distroless/static has and the binary at
    `entrypoint_path`, read-only as the manifests mount it."""
    (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnonroot:x:65532:\n")
    (root / "etc/nsswitch.conf").write_text(DISTROLESS_NSSWITCH)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    for directory in ["tmp", "home/nonroot"]:
        (root / directory).mkdir(parents=True, exist_ok=True)
    placed = root / entrypoint_path.lstrip("/")
    placed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, placed)


def serve_and_check(binary, user, env, runtime, scratch, empty_root):
    """Runs the image's command as the image would, its ports moved, and
    checks a rewrite and that nothing was written to disk. With `empty_root`
    (the script running as root), it runs chrooted into a root holding only
    what distroless/static has: no library or file of this machine's is
    there to lean on."""
    files = scratch / ("runtime-root" if empty_root else "mounted")
    certificates = scratch / "certificates"
    subprocess.run(
        [str(binary), "certs", "--out", str(certificates), "--extra-san", "localhost"],
        check=True, capture_output=True,
    )
    arguments = image_command(runtime, files)
    # What the manifests mount at the paths the command names.
    sources = {
        "--config": REPO / "examples" / "config.yaml",
        "--tls-cert": certificates / "tls.crt",
        "--tls-key": certificates / "tls.key",
    }
    for flag, source in sources.items():
        if flag not in arguments:
            fail(f"the image's CMD has no {flag}: {arguments}")
        target = Path(arguments[arguments.index(flag) + 1])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    entrypoint = next((json.loads(a) for k, a in reversed(runtime) if k == "ENTRYPOINT"), [])
    if empty_root:
        distroless_static_root(files, binary, entrypoint[0])
    # Mounted ConfigMaps and Secrets are read-only to the pod (and so is the
    # root filesystem, in the manifests).
    for directory, _, names in os.walk(files, topdown=False):
        for name in names:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)
    if empty_root:
        os.chmod(files / entrypoint[0].lstrip("/"), 0o555)
    port, metrics_port = free_port(), free_port()
    trace = scratch / "strace.txt"
    uid, _, gid = user.partition(":")
    if empty_root:
        as_user = [shutil.which("chroot"), f"--userspec={uid}:{gid or uid}", "--groups=", str(files)]
        binary = entrypoint[0]
        arguments = image_command(runtime, "")
    elif os.geteuid() == 0:
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups"]
    else:
        print(f"not root: serve runs as uid {os.geteuid()}, not the image's {user}")
        as_user = []
        user = str(os.geteuid())
    command = [
        "strace", "-f", "-qq", "-o", str(trace), "-e", "trace=%file,ftruncate",
        *as_user, str(binary), *arguments,
        "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
    ]
    where = f"chrooted into {files}, a distroless/static root" if empty_root else f"paths under {files}"
    print(f"serve: the image's command {' '.join(arguments)} ({where}), ports moved")
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ca = str(certificates / "ca.crt")
        url = f"https://localhost:{port}"
        for _ in range(100):
            ready = subprocess.run(
                ["curl", "-sf", "--cacert", ca, f"{url}/readyz"], capture_output=True
            )
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        else:
            fail(f"serve did not become ready; its log: {(scratch / 'server.log').read_text()}")
        answer = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", ca, "-H", "Content-Type: application/json",
             "--data-binary", f"@{REPO / 'examples' / 'admission-review.json'}",
             f"{url}/mutate?timeout=10s"],
            capture_output=True, check=True,
        )
        response = json.loads(answer.stdout)["response"]
        if not response.get("allowed") or response.get("patchType") != "JSONPatch":
            fail(f"no patch in the answer: {response}")
        patch = json.loads(base64.b64decode(response["patch"]))
        images = [operation["value"] for operation in patch
                  if operation["path"].endswith("/image")]
        if not images:
            fail(f"the patch rewrites no image: {patch}")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        rewritten = [line for line in metrics.splitlines()
                     if line.startswith("image_rewriter_images_rewritten_total")]
        print(f"serve as uid {user}: /mutate rewrote {', '.join(images)}; {'; '.join(rewritten)}")
    finally:
        # SIGTERM for serve, as the kubelet sends it, not for strace (which
        # would detach and leave serve running); strace exits with its status.
        traced = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True)
        signal_each(traced.stdout.split(), signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            signal_each(traced.stdout.split(), signal.SIGKILL)
            server.kill()
            server.wait()
        log.close()
    if server.returncode != 0:
        fail(f"serve exited {server.returncode} after SIGTERM; its log: {(scratch / 'server.log').read_text()}")
    writes = filesystem_writes(trace.read_text())
    if writes:
        fail("serve wrote to the filesystem:\n  " + "\n  ".join(writes[:20]))
    calls = sum(1 for line in trace.read_text().splitlines() if re.match(r"\d+\s+\w+\(", line))
    print(f"serve made {calls} file syscalls (opens, stats), none that writes or changes a file")


def check_the_checks():
    """The write filter and the package rule on known input, so a change
    that blinds them fails here rather than passing every image."""
    trace = "\n".join([
        '7 openat(AT_FDCWD, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 3',
        '7 openat(AT_FDCWD, "/dev/null", O_RDWR) = 3',
        '7 openat(AT_FDCWD, "/x", O_WRONLY|O_CREAT, 0644) = -1 EROFS (Read-only file system)',
        '7 mkdir("/tmp/a", 0777) = -1 EEXIST (File exists)',
        '7 rename("/dev/x", "/y") = 0',
        '7 ftruncate(3, 0) = 0',
    ])
    flagged = [line.split()[1].split("(")[0] for line in filesystem_writes(trace)]
    if flagged != ["openat", "mkdir", "rename", "ftruncate"]:
        fail(f"the write filter flags {flagged} in its own sample")
    if packages_installed("apt-get update && apt-get install -y --no-install-recommends a b") != ["a", "b"]:
        fail("the package rule misreads its own sample")


def main():
    check_the_checks()
    keep = "--keep" in sys.argv[1:]
    for tool in ["cargo", "readelf", "strace", "setpriv", "chroot", "curl", "dpkg-query", "pgrep"]:
        if shutil.which(tool) is None:
            fail(f"{tool} is missing")

    global_args, all_stages = stages(instructions(DOCKERFILE.read_text()))
    if len(all_stages) < 2:
        fail("expected a build stage and a runtime stage")
    build_from, build = all_stages[0]
    runtime_from, runtime = all_stages[-1]
    stage_name = build_from.split()[-1] if " AS " in build_from.upper() else None
    copies = [arguments for keyword, arguments in runtime
              if keyword == "COPY" and arguments.startswith(f"--from={stage_name} ")]
    if not copies:
        fail(f"the runtime stage copies nothing from the {stage_name} stage")
    built_path, copied_to = shlex.split(copies[0])[1:3]
    entrypoint = next((json.loads(a) for k, a in reversed(runtime) if k == "ENTRYPOINT"), [])
    if entrypoint[:1] != [copied_to]:
        fail(f"the runtime stage copies the binary to {copied_to}, but its ENTRYPOINT runs {entrypoint[:1]}")
    # The last USER is the one the image runs as; without one, or with root,
    # runAsNonRoot refuses the pod.
    user = next((arguments for keyword, arguments in reversed(runtime) if keyword == "USER"), None)
    if user is None or user.split(":")[0] in ("0", "root"):
        fail(f"the runtime stage runs as {user or 'root (no USER)'}; the manifests need a non-root USER")
    runtime_env = {"PATH": "/usr/bin:/bin"}
    for keyword, arguments in runtime:
        if keyword == "ENV":
            runtime_env.update(assignments(keyword, arguments))

    scratch = Path(tempfile.mkdtemp(prefix="image-build-"))
    if os.geteuid() == 0:
        os.chmod(scratch, 0o755)  # the image's user reads the binary and files
    try:
        context = scratch / "context"
        count = copy_context(context)
        print(f"context: {count} files after .dockerignore")
        root = scratch / "root"
        root.mkdir()
        # The top-level paths the build stage writes or reads as its own.
        created = {arguments.strip("/").split("/")[0] for keyword, arguments in build if keyword == "WORKDIR"}
        created.add(built_path.strip("/").split("/")[0])
        for keyword, arguments in build:
            if keyword == "RUN":
                created.update(re.findall(r">\s*/([\w.-]+)", arguments))
        # Redirections to the host's own directories (`2>/dev/null`) stay.
        created -= {"bin", "dev", "etc", "home", "lib", "proc", "root", "run", "sys", "tmp", "usr", "var"}
        stage = Stage(root, context, created, global_args)
        # BuildKit sets TARGETARCH from the platform; this machine's.
        machine = os.uname().machine
        stage.env.setdefault("TARGETARCH", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine))
        host_rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True,
                                    env=stage.env, cwd=root).stdout.strip()
        print(f"== build stage ({build_from}), / at {root}")
        print(f"toolchain: this machine's {host_rustc}; the image's RUST_VERSION={global_args.get('RUST_VERSION', '?')}")
        for keyword, arguments in build:
            stage.run(keyword, arguments)

        binary = root / built_path.lstrip("/")
        if not binary.is_file():
            fail(f"the build stage did not produce {built_path}")
        print(f"== the binary the runtime stage ({runtime_from}) copies: {built_path}")
        print(f"{binary.stat().st_size / 1e6:.1f} MB, {check_runs_on(runtime_from, binary)}")
        shutil.copy2(binary, scratch / "image-rewriter")
        os.chmod(scratch / "image-rewriter", 0o755)
        # check_runs_on passed: the base has no libc, and the binary is static.
        if os.geteuid() != 0:
            print("not root: serve runs on this machine's root filesystem, not chrooted into a distroless/static one")
        serve_and_check(scratch / "image-rewriter", user, runtime_env, runtime, scratch,
                        empty_root=os.geteuid() == 0)
        print("image-build-check: ok")
    finally:
        if keep:
            print(f"kept {scratch}")
        else:
            # The read-only "mounts" would stop a caller who is not root.
            for directory, _, _ in os.walk(scratch):
                os.chmod(directory, 0o755)
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
