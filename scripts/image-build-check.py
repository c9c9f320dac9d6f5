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

- it is a static executable (no ELF interpreter), as distroless/static needs;
- it runs as the image's user (`USER` of the final stage, 65532; when the
  script runs as root, else as the caller) and serves
  `/mutate` with the final stage's environment (`ENV`), with its config and
  certificate as read-only files, and rewrites a pod;
- it opens no file for writing and creates none (the manifests mount the
  root filesystem read-only), traced with strace.

Not covered: the base images (`rust:*-slim`, `distroless/static`) and the
final layers; a RUN that installs Debian packages is not run (it would
install them on this machine): the script checks that they are installed
instead. Exits non-zero, saying why, on the first failure.
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


def stages(all_instructions):
    """Splits the instructions at each FROM: [(from_arguments, [instructions])]."""
    result = []
    for keyword, arguments in all_instructions:
        if keyword == "FROM":
            result.append((arguments, []))
        elif result:
            result[-1][1].append((keyword, arguments))
    return result


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


class Stage:
    """Runs one stage's instructions with `root` standing for `/`."""

    def __init__(self, root, context, top_level_names):
        self.root = root
        self.context = context
        self.shell = ["/bin/sh", "-c"]
        # The stage's own environment: a target directory set here would
        # move the build's output away from where the stage copies it.
        self.env = {name: value for name, value in os.environ.items() if name != "CARGO_TARGET_DIR"}
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
            name, _, default = arguments.partition("=")
            if name not in self.env:
                self.env[name] = default
            print(f"ARG {name}={self.env[name]}")
        elif keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
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
            steps = [step.strip() for step in arguments.split("&&")]
            if any(step.startswith("apt-get install") for step in steps):
                # Only a RUN that does nothing else is left out, so no other
                # step is skipped with it.
                others = [step for step in steps if not step.startswith(
                    ("apt-get update", "apt-get install", "rm -rf /var/lib/apt/lists"))]
                if others:
                    fail(f"a RUN that installs Debian packages also runs {others}: not supported")
                install = next(step for step in steps if step.startswith("apt-get install"))
                names = [word for word in install.split()[2:] if not word.startswith("-")]
                for name in names:
                    installed = subprocess.run(
                        ["dpkg-query", "-W", "-f=${Status}", name],
                        capture_output=True, text=True,
                    )
                    if "install ok installed" not in installed.stdout:
                        fail(f"the Dockerfile installs {name}; install it here: apt-get install {name}")
                print(f"RUN (not run: installs Debian packages; installed here: {' '.join(names)})")
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


def static_executable(path):
    """True when the ELF file has no PT_INTERP program header."""
    headers = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True, check=True)
    return "INTERP" not in headers.stdout and "Program Headers" in headers.stdout


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def filesystem_writes(trace):
    """The strace lines that open a file for writing, or create, rename,
    remove or truncate one (failed attempts to create included)."""
    writes = []
    for line in trace.splitlines():
        opened_for_writing = re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", line)
        changed = re.search(
            r"\b(creat|mkdir|mkdirat|rename|renameat2?|unlink|unlinkat|truncate)\(", line
        )
        if (opened_for_writing or changed) and ("= -1" not in line or "O_CREAT" in line):
            writes.append(line)
    # /dev/null and the like are not the root filesystem.
    return [line for line in writes if not re.search(r'"/(dev|proc)/', line)]


def serve_and_check(binary, user, env, scratch):
    """Runs `serve` as the image would, and checks a rewrite and that nothing
    was written to disk."""
    files = scratch / "mounted"
    subprocess.run(
        [str(binary), "certs", "--out", str(files / "tls"), "--extra-san", "localhost"],
        check=True, capture_output=True,
    )
    shutil.copy2(REPO / "examples" / "config.yaml", files / "config.yaml")
    # Mounted ConfigMaps and Secrets are read-only to the pod.
    for path in [files / "config.yaml", *(files / "tls").iterdir()]:
        path.chmod(0o444)
    for path in [files / "tls", files]:
        path.chmod(0o555)
    port, metrics_port = free_port(), free_port()
    trace = scratch / "strace.txt"
    uid, _, gid = user.partition(":")
    if os.geteuid() == 0:
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups"]
    else:
        print(f"not root: serve runs as uid {os.geteuid()}, not the image's {user}")
        as_user = []
        user = str(os.geteuid())
    command = [
        "strace", "-f", "-qq", "-o", str(trace),
        "-e", "trace=open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,truncate",
        *as_user,
        str(binary), "serve", "--no-api",
        "--config", str(files / "config.yaml"),
        "--tls-cert", str(files / "tls" / "tls.crt"),
        "--tls-key", str(files / "tls" / "tls.key"),
        "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--shutdown-delay", "0s",
    ]
    log = open(scratch / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ca = str(files / "tls" / "ca.crt")
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
        for pid in traced.stdout.split():
            os.kill(int(pid), signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in traced.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            server.kill()
            server.wait()
        log.close()
    if server.returncode != 0:
        fail(f"serve exited {server.returncode} after SIGTERM; its log: {(scratch / 'server.log').read_text()}")
    writes = filesystem_writes(trace.read_text())
    if writes:
        fail("serve wrote to the filesystem:\n  " + "\n  ".join(writes[:20]))
    opens = sum(1 for line in trace.read_text().splitlines() if "open" in line)
    print(f"serve opened {opens} files, none for writing, and created or removed none")


def main():
    keep = "--keep" in sys.argv[1:]
    for tool in ["cargo", "rustup", "readelf", "strace", "setpriv", "curl", "dpkg-query", "pgrep"]:
        if shutil.which(tool) is None:
            fail(f"{tool} is missing")

    all_stages = stages(instructions(DOCKERFILE.read_text()))
    if len(all_stages) < 2:
        fail("expected a build stage and a runtime stage")
    build_from, build = all_stages[0]
    runtime_from, runtime = all_stages[-1]
    stage_name = build_from.split()[-1] if " AS " in build_from.upper() else None
    copies = [arguments for keyword, arguments in runtime
              if keyword == "COPY" and arguments.startswith(f"--from={stage_name} ")]
    if not copies:
        fail(f"the runtime stage copies nothing from the {stage_name} stage")
    built_path = shlex.split(copies[0])[1]
    user = next((arguments for keyword, arguments in runtime if keyword == "USER"), "0")
    runtime_env = {"PATH": "/usr/bin:/bin"}
    for keyword, arguments in runtime:
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                runtime_env[name] = value

    scratch = Path(tempfile.mkdtemp(prefix="image-build-"))
    os.chmod(scratch, 0o755)
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
        stage = Stage(root, context, created)
        # BuildKit sets TARGETARCH from the platform; this machine's.
        machine = os.uname().machine
        stage.env.setdefault("TARGETARCH", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine))
        print(f"== build stage ({build_from}), / at {root}")
        for keyword, arguments in build:
            stage.run(keyword, arguments)

        binary = root / built_path.lstrip("/")
        if not binary.is_file():
            fail(f"the build stage did not produce {built_path}")
        print(f"== the binary the runtime stage ({runtime_from}) copies: {built_path}")
        if not static_executable(binary):
            fail(f"{built_path} needs an ELF interpreter (dynamic), distroless/static has none")
        print(f"static executable ({binary.stat().st_size / 1e6:.1f} MB), no ELF interpreter")
        shutil.copy2(binary, scratch / "image-rewriter")
        os.chmod(scratch / "image-rewriter", 0o755)
        serve_and_check(scratch / "image-rewriter", user, runtime_env, scratch)
        print("image-build-check: ok")
    finally:
        if keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
