"""The `aivmm run --workdir` scenarios of the nested-VM harness (imported by harness.py).

L1 side: l1-run.sh (sourced by l1-init.sh). Each scenario runs one or more
`aivmm run --workdir` with the Debian guest image without Claude (the same
read-only disk as guest-exit-status), and `aivmm ps/stop/exec` beside them. L1
prints `E2E-CHECK <name> ok|FAIL <why>` lines under a run's tag; this module
checks them, the exit statuses (from vmmrun's @@X lines) and what the commands
printed.
"""

import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    "workdir": "run --workdir as uid 1000: sh -c creates, appends, edits (sed -i), renames and deletes "
    "files and dirs in /work; L1 sees each change, every new file owned 1000:1000; exit 3 comes through",
    "parallel": "two VMs on two workdirs at once (512M each); both --share-rw one directory at the same "
    "path and each waits there for the other; --share-ro is readable and refuses writes",
    "lock": "a second run on a workdir with a running VM is refused with one clear error line; after "
    "`aivmm stop` a new run on it works; --disk-size 2G then grows the state disk and the guest's "
    "filesystem, and 1G again is refused with one line",
    "env": "--env NAME=VALUE and --env NAME (from L1's environment) reach the command; neither value is "
    "in the guest's /proc/cmdline",
    "claude-auth": "--claude-auth: the guest gets a copy of L1's credentials and of ~/.claude.json's auth "
    "fields only; its hook, command and refreshed token land in its own copy, and only the token (newer, "
    "checked) comes back to L1's ~/.claude, which is otherwise byte-for-byte unchanged",
    "stop": "`aivmm ps` lists the running VM, `aivmm exec` runs a command in it (exit 5 comes back), "
    "`aivmm stop` presses the ACPI power button and the guest shuts down cleanly (agent sees KEY_POWER, "
    "/work unmounted, S5 power-off, no kill); a guest whose button driver is unbound is killed after "
    "--timeout 6 and `aivmm stop` says so (exit 1); a stop while the guest boots powers it off once its "
    "button driver and agent are up (aivmm presses every second)",
    "nested": "/dev/kvm in the guest: KVM_GET_API_VERSION = 12, KVM_CREATE_VM and KVM_CREATE_VCPU work",
    "ssh": "run --ssh with user networking (passt): L1's ssh reaches the guest's sshd on 127.0.0.1 with the "
    "generated key, through the generated `ssh -F` config (retrying until the guest is up) and by hand with -i/-p "
    "and strict host key checking against the recorded key; an unrecorded host name and a foreign key are refused",
    "terminal": "interactive bash in the guest in a tmux pane: typed input answered, `stty size` equals the "
    "pane's size before and after tmux resize-window to 100x30 (and a WINCH trap runs), Ctrl-C interrupts "
    "sleep, `exit 7` ends aivmm with 7",
    "trust": "a workdir aivmm.toml asking for a share of an L1 secret dir, env passthrough and claude_auth is "
    "refused in one line naming those keys, before anything boots; `cpus = 2` alone runs untrusted; after `aivmm "
    "trust` the file runs (secret, env and credentials reach the guest); a guest's edit of it makes the next run "
    "refuse it; after --revoke it is refused again",
    "protected-paths": "in a git workdir the guest's writes, creates and renames over .git/config, "
    ".git/hooks/pre-commit, aivmm.toml and .envrc fail with EROFS; git commit works; L1's git status and "
    "commit run nothing the guest planted; a repo the guest git-inits gets no executable hook, and its "
    "core.fsmonitor is reported when the VM stops",
    "agent-hostile": "the guest agent replaced by `aivmm-agent --hostile`: oversized, unknown and truncated "
    "frames each close the agent's channel with a log line naming the problem; the guest goes on (its agent "
    "sees the close), powers off cleanly, then the run ends with one error line, no panic, no aivmm left; "
    "a 256 MiB output flood is relayed whole",
    "long-work": "four minutes of CPU-bound work in /work (xz over 200 files, round after round, then git "
    "init/add/commit): the run completes, L1 finds every output and the repository intact",
}

# Each uses the noclaude guest image disk.
IMAGE_KIND = "noclaude"
NOT_DEFAULT = {"long-work"}  # 5+ minutes: run it by name
BUDGET = {"agent-hostile": 700, "protected-paths": 300, "trust": 700, "long-work": 1000, "claude-auth": 120, "workdir": 150, "parallel": 200, "lock": 400, "env": 120, "stop": 400, "nested": 150,
          "terminal": 200, "ssh": 300}

# Checks that must be present, per run tag.
REQUIRED = {
    "workdir": ["l1-a", "l1-guest-clock", "l1-guest-tools", "l1-deep", "l1-renamed", "l1-host-edit", "l1-deleted", "l1-guest-uid", "l1-owner"],
    "parallel": ["l1-workdirs", "l1-meet", "l1-ro-untouched"],
    "lock/a": ["started"],
    "stop/a": ["started"],
    "stop/ignore-a": ["started"],
    "stop/exec": ["l1-exec-file"],
    "claude-auth": ["l1-claude-unchanged", "l1-claude-no-commands", "l1-claude-token", "l1-claude-copy"],
    "ssh/a": ["started", "ssh-config", "guest-answered", "host-key-recorded", "strict-host-key", "by-hand",
              "other-key-refused"],
    "protected-paths": ["config-append", "hook-create", "aivmm-toml", "config-rename-over", "toml-rename-over",
                        "envrc-create", "guest-commit", "l1-config-unchanged", "l1-no-hook", "l1-no-envrc",
                        "l1-guest-commit", "l1-nothing-ran", "l1-sub-hook-not-executable"],
    "agent-hostile/oversized": ["no-aivmm-left"],
    "agent-hostile/unknown": ["no-aivmm-left"],
    "agent-hostile/truncated": ["no-aivmm-left"],
    "agent-hostile/flood": ["no-aivmm-left"],
    "trust/refused": ["no-state"],
    "trust/pin": ["modes"],
    "long-work": ["l1-outputs", "l1-sums", "l1-git"],
    "terminal": ["prompt", "typed-input", "size-initial", "pane-resized", "resized", "winch-trap", "ctrl-c",
                 "exit-status"],
}


def l1_extras(cpio, moddir, h):
    """L1 side: l1-run.sh, runtool (static), ssh and ssh-keygen, tmux with its libraries, the
    `screen` terminfo entry and the C.UTF-8 locale (devpts for tmux's ptys is
    mounted by l1-run.sh)."""
    cpio.copy("l1-run.sh", os.path.join(HERE, "l1-run.sh"), 0o644)
    out = os.path.join(h.WORK, "runtool")
    src = os.path.join(HERE, "runtool.c")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        r = subprocess.run(["gcc", "-static", "-O2", "-o", out, src], capture_output=True, text=True)
        if r.returncode != 0:
            h.die(f"building runtool failed (gcc, libc6-dev):\n{r.stderr}")
    cpio.copy("bin/runtool", out, 0o755)
    for tool in ("ssh", "ssh-keygen"):
        path = shutil.which(tool)
        if not path:
            h.die(f"no {tool} (apt-get install openssh-client) for the ssh scenario")
        h.add_binary(cpio, f"bin/{tool}", path)
    tmux = shutil.which("tmux")
    if not tmux:
        h.die("no tmux (apt-get install tmux) for the terminal scenario")
    h.add_binary(cpio, "bin/tmux", tmux)
    for d in ("/lib/terminfo", "/usr/share/terminfo"):
        p = os.path.join(d, "s", "screen")
        if os.path.exists(p):
            cpio.copy("usr/share/terminfo/s/screen", os.path.realpath(p), 0o644)
            break
    # tmux refuses to start without a UTF-8 locale; glibc's C.UTF-8 is a directory.
    loc = "/usr/lib/locale/C.utf8"
    if not os.path.isdir(loc):
        h.die(f"no {loc} (glibc's C.UTF-8 locale, package libc-bin) for tmux")
    for base, _, files in os.walk(loc):
        for f in files:
            src = os.path.join(base, f)
            cpio.copy(src.lstrip("/"), src, 0o644)


def _lines(r):
    return [l for _, l in r.out] if r else []


def _exit_is(problems, sc, tag, want):
    r = sc.runs.get(tag)
    if r is None:
        problems.append(f"{tag}: did not run")
        return None
    if r.exit is None:
        problems.append(f"{tag}: no exit report")
    elif r.timeout:
        problems.append(f"{tag}: timed out after {r.wall_ms} ms")
    elif want is not None and r.exit not in want:
        errs = [l for _, l in r.err if l.strip()]
        problems.append(f"{tag}: exit status {r.exit}, want {'/'.join(want)}" + (f": {errs[0]}" if errs else ""))
    if any("panicked" in l for _, l in (r.out + r.err)):
        problems.append(f"{tag}: Rust panic: {next(l for _, l in r.out + r.err if 'panicked' in l)}")
    return r


def _lines_err(r):
    return [l for _, l in r.err if l.strip()][:3] if r else []


def _exit_outlasted(st):
    """A note when `aivmm stop` saw the guest off (vm.json `ended`) but aivmm
    still exiting at its --timeout: L1 freeing the guest's RAM, which stop waits for."""
    if st is not None and any("is still exiting" in l for _, l in st.err):
        return " (aivmm's exit outlasted --timeout: L1 freeing guest RAM; stop waited, vm.json said ended)"
    return ""


def _span_ms(lines, first, last):
    """ms between the first log line holding `first` and the next holding `last`
    (aivmm.log lines start with seconds.micros since the epoch)."""
    t0 = None
    for l in lines:
        try:
            t = float(l.split()[0])
        except (ValueError, IndexError):
            continue
        if t0 is None and first in l:
            t0 = t
        elif t0 is not None and last in l:
            return int((t - t0) * 1000)
    return None


def _has(problems, r, tag, needle):
    if r is not None and not any(needle in l for l in _lines(r)):
        problems.append(f"{tag}: no {needle!r} in the output")


def judge(sc):
    """(ok, message, extra lines)."""
    problems, info = [], []
    checks = {}
    for tag, r in sc.runs.items():
        for _, line in r.out:
            i = line.find("E2E-CHECK ")
            if i < 0:
                continue
            parts = line[i + 10:].split(" ", 2)
            name, status = parts[0], parts[1] if len(parts) > 1 else ""
            checks.setdefault(tag, {})[name] = (status, parts[2] if len(parts) > 2 else "")
    for tag, cs in checks.items():
        for name, (status, why) in cs.items():
            if status != "ok":
                problems.append(f"{tag}: {name} {status} {why}".strip())
    for tag, names in REQUIRED.items():
        if tag.split("/")[0] != sc.name:
            continue
        missing = [n for n in names if n not in checks.get(tag, {})]
        if missing:
            problems.append(f"{tag}: checks missing: {' '.join(missing)}")
    n = sc.name
    if n == "workdir":
        r = _exit_is(problems, sc, "workdir", ["3"])
        _has(problems, r, "workdir", "workdir-guest-done")
        if r and r.exit == "3":
            info.append(f"exit 3 passed through; 7 L1 checks of the files; aivmm exit after {r.wall_ms} ms")
    elif n == "parallel":
        walls = []
        for k in ("1", "2"):
            r = _exit_is(problems, sc, f"parallel/{k}", ["0"])
            other = "2" if k == "1" else "1"
            _has(problems, r, f"parallel/{k}", f"saw-vm{other}")
            _has(problems, r, f"parallel/{k}", "ro=ro-content")
            _has(problems, r, f"parallel/{k}", "ro-refused")
            if r:
                walls.append(r.wall_ms)
        info.append(f"both VMs saw each other's marker in the shared dir; --share-ro read ok, write refused; "
                    f"walls {walls} ms")
    elif n == "lock":
        _exit_is(problems, sc, "lock/a", ["129", "143"])
        b = _exit_is(problems, sc, "lock/b", None)
        if b is not None and b.exit is not None:
            errs = [l for _, l in b.err if l.strip()]
            if b.exit == "0":
                problems.append("lock/b: the second run on the workdir was not refused (exit 0)")
            if len(errs) != 1 or "already running" not in errs[0] or not errs[0].startswith("aivmm: error:"):
                problems.append(f"lock/b: want one 'aivmm: error: … already running …' line, got {errs[:3]}")
            if any("second-run-ran" in l for l in _lines(b)):
                problems.append("lock/b: the second run's command ran")
            info.append(f"refused in {b.wall_ms} ms: {errs[0] if errs else ''}")
        _exit_is(problems, sc, "lock/stop", ["0"])
        c = _exit_is(problems, sc, "lock/c", ["0"])
        _has(problems, c, "lock/c", "third-run-ran")
        g = _exit_is(problems, sc, "lock/grow", ["0"])
        _has(problems, g, "lock/grow", "grown-run-ran")
        kib = {}
        for tag, r in (("lock/c", c), ("lock/grow", g)):
            for l in _lines(r) if r else []:
                m = re.search(r"state-kib=(\d+)", l)
                if m:
                    kib[tag] = int(m.group(1))
        before, after = kib.get("lock/c"), kib.get("lock/grow")
        if before is None or after is None:
            problems.append(f"lock: the guest's root filesystem size is missing ({kib})")
        elif not (before < 1.1 * 2**20 and after > 1.7 * 2**20):
            problems.append(f"lock/grow: the state filesystem went from {before} to {after} KiB with "
                            f"--disk-size 1G then 2G")
        shr = _exit_is(problems, sc, "lock/shrink", None)
        if shr is not None and shr.exit is not None:
            errs = [l for _, l in shr.err if l.startswith("aivmm: error:")]
            if shr.exit == "0" or any("shrink-ran" in l for l in _lines(shr)):
                problems.append("lock/shrink: --disk-size 1G on a 2G state disk was not refused")
            if len(errs) != 1 or "never shrinks" not in errs[0]:
                problems.append(f"lock/shrink: want one 'aivmm: error: … never shrinks …' line, got {errs[:3]}")
        info.append(f"state filesystem {before} KiB at --disk-size 1G, {after} KiB after 2G; 1G again: "
                    f"{(errs[0] if shr is not None and shr.exit is not None and errs else '?')}")
    elif n == "env":
        r = _exit_is(problems, sc, "env", ["0"])
        _has(problems, r, "env", "env-secret=s3cr3t-Value-42")
        _has(problems, r, "env", "env-from-l1=from-l1-value")
        _has(problems, r, "env", "cmdline-clean")
        leak = [l for l in _lines(r) if l.startswith("cmdline:") and ("s3cr3t" in l or "from-l1-value" in l)]
        if leak or any("cmdline-LEAK" in l for l in _lines(r)):
            problems.append(f"env: a value is on the kernel command line: {leak[:1]}")
        cl = next((l for l in _lines(r) if l.startswith("cmdline:")), "")
        info.append(f"both variables in the guest; guest {cl.strip()}")
    elif n == "claude-auth":
        r = _exit_is(problems, sc, "claude-auth", ["0"])
        _has(problems, r, "claude-auth", '"accessToken":"sk-l1-old"')
        _has(problems, r, "claude-auth", 'claude-json={"oauthAccount":{"emailAddress":"l1@e2e"}}')
        _has(problems, r, "claude-auth", "claude-settings=none")
        if any("mcpServers" in l or "theme" in l for l in _lines(r)):
            problems.append("claude-auth: more than the credentials and auth fields reached the guest")
        info.append("credentials and auth fields copied in; the guest's hook and command stayed in the guest, "
                    "its refreshed token reached L1 and nothing else did")
    elif n == "stop":
        a = _exit_is(problems, sc, "stop/a", ["129", "143"])
        _has(problems, a, "stop/a", "bg-started")
        ps = _exit_is(problems, sc, "stop/ps", ["0"])
        if ps is not None:
            rows = [l for l in _lines(ps) if "/tmp/rn-stop" in l]
            if not rows or "running" not in rows[0]:
                problems.append(f"stop/ps: no running row for /tmp/rn-stop: {_lines(ps)[:3]}")
            else:
                info.append(f"ps: {' '.join(rows[0].split())}")
        ex = _exit_is(problems, sc, "stop/exec", ["5"])
        _has(problems, ex, "stop/exec", "exec-ran uid=0 pwd=/work")
        st = _exit_is(problems, sc, "stop/stop", ["0"])
        if st is not None and any("killing it" in l for _, l in st.err):
            problems.append("stop/stop: the VM did not power off; aivmm stop killed it")
        if st is not None and not any("powered off after the power button" in l for _, l in st.err):
            problems.append(f"stop/stop: no 'powered off after the power button' in {_lines_err(st)}")
        con = sc.runs.get("stop/a/console")
        for needle, why in [("aivmm-agent: power button pressed", "the agent did not see KEY_POWER"),
                            ("aivmm-init: unmounted /work", "the guest did not unmount /work"),
                            ("Power down", "the guest console does not end with 'reboot: Power down'")]:
            if con is None or not any(needle in l for l in _lines(con)):
                problems.append(f"stop/a console: no {needle!r}: {why}")
        vmlog = _lines(sc.runs.get("stop/a/vmlog"))
        for needle in ("pressing the power button", "power button pressed", "the VM ended: PowerOff"):
            if not any(needle in l for l in vmlog):
                problems.append(f"stop/a aivmm.log: no {needle!r}")
        press_to_off = _span_ms(vmlog, "pressing the power button", "the VM ended")
        after = sc.runs.get("stop/ps-after")
        if after is not None and any("/tmp/rn-stop " in l or l.rstrip().endswith("/tmp/rn-stop") for l in _lines(after)):
            problems.append("stop/ps-after: the stopped VM is still listed")
        if st is not None and a is not None:
            info.append(f"exec exit 5 came back; power button stop took {st.wall_ms} ms (press to VM end "
                        f"{press_to_off} ms in aivmm.log); KEY_POWER seen, /work unmounted, ACPI S5, "
                        f"aivmm exit {a.exit}")
        # The guest that ignores the button.
        ia = _exit_is(problems, sc, "stop/ignore-a", None)
        _has(problems, ia, "stop/ignore-a", "button-ignored")
        if ia is not None and ia.exit not in ("sig9", "137"):
            problems.append(f"stop/ignore-a: aivmm exit {ia.exit}, want killed (sig9)")
        ig = _exit_is(problems, sc, "stop/ignore", ["1"])
        if ig is not None and not any("did not power off within 6 s of the power button; killing it" in l
                                      for _, l in ig.err):
            problems.append(f"stop/ignore: no 'did not power off within 6 s … killing it' in {_lines_err(ig)}")
        ivm = _lines(sc.runs.get("stop/ignore-a/vmlog"))
        if not any("pressing the power button" in l for l in ivm):
            problems.append("stop/ignore-a aivmm.log: no 'pressing the power button'")
        presses = sum(1 for l in ivm if "power button pressed" in l)
        after = sc.runs.get("stop/ps-after-kill")
        if after is not None and any("/tmp/rn-stop-ignore" in l for l in _lines(after)):
            problems.append("stop/ps-after-kill: the killed VM is still listed")
        if ig is not None:
            info.append(f"button ignored (driver unbound): killed after --timeout 6, stop took {ig.wall_ms} ms, "
                        f"exit 1 with the kill reported; aivmm.log shows the press ({presses} logged)")
        # Stopped while booting.
        bps = _lines(sc.runs.get("stop/boot-ps"))
        brow = next((" ".join(l.split()) for l in bps if "/tmp/rn-stop-boot" in l), "")
        ba = _exit_is(problems, sc, "stop/boot-a", ["143", "129"])
        bs = _exit_is(problems, sc, "stop/boot", ["0"])
        bvm = _lines(sc.runs.get("stop/boot-a/vmlog"))
        if not any("the VM ended: PowerOff" in l for l in bvm):
            problems.append("stop/boot-a aivmm.log: no 'the VM ended: PowerOff' (the guest did not power off)")
        bcon = _lines(sc.runs.get("stop/boot-a/console"))
        seen = next((l for l in bcon if "aivmm-agent: power button pressed" in l), "")
        if not seen:
            problems.append("stop/boot-a console: the agent never saw the power button")
        if bs is not None and ba is not None:
            state = brow.split()[2] if len(brow.split()) > 2 else "?"
            info.append(f"stop while booting (ps state {state}): stop took {bs.wall_ms} ms "
                        f"(press to VM end {_span_ms(bvm, 'pressing the power button', 'the VM ended')} ms), "
                        f"aivmm exit {ba.exit}{_exit_outlasted(bs)}; guest: {seen.strip()}")
    elif n == "nested":
        r = _exit_is(problems, sc, "nested", ["0"])
        line = next((l for l in _lines(r) if "E2E-KVM" in l), None)
        _has(problems, r, "nested", "cpu-virt=yes")
        if line is None:
            problems.append("nested: runtool kvm printed nothing")
        else:
            info.append(line.split("E2E-KVM", 1)[1].strip())
    elif n == "ssh":
        a = _exit_is(problems, sc, "ssh/a", ["129", "143"])
        out = _lines(sc.runs.get("ssh/config-ssh"))
        uname = next((l for l in out if l.startswith("Linux ")), None)
        if uname is None:
            problems.append(f"ssh: no `uname -a` answer from the guest: {out[:3]}")
        attempts = next((l.split("ssh attempts:", 1)[1].strip() for l in _lines(a) if "ssh attempts:" in l), "?")
        st = _exit_is(problems, sc, "ssh/stop", ["0"])
        ps = _lines(sc.runs.get("ssh/ps"))
        row = next((l for l in ps if "/tmp/rn-ssh" in l), "")
        if ":22" not in row:
            problems.append(f"ssh/ps: no forward to guest port 22 listed: {row!r}")
        info.append(f"guest answered over ssh ({attempts}): {uname}; by-hand -i/-p with strict host key ok, "
                    f"unknown host name and foreign key refused; ps: {' '.join(row.split())}; "
                    f"stopped by the power button in {st.wall_ms if st else '?'} ms{_exit_outlasted(st)}")
    elif n == "trust":
        keys = "share_ro, env, claude_auth"
        for tag in ("trust/refused", "trust/revoked"):
            r = _exit_is(problems, sc, tag, None)
            if r is None:
                continue
            errs = [l for _, l in r.err if l.strip()]
            if r.exit in (None, "0"):
                problems.append(f"{tag}: exit {r.exit}, want a refusal")
            if len(errs) != 1 or keys not in errs[0] or "aivmm trust" not in errs[0]:
                problems.append(f"{tag}: want one error line naming {keys} and `aivmm trust`, got {errs[:3]}")
            if any("BOOTED" in l for l in _lines(r)):
                problems.append(f"{tag}: the guest booted")
            if r.wall_ms and r.wall_ms > 20000:
                problems.append(f"{tag}: the refusal took {r.wall_ms} ms")
        r = _exit_is(problems, sc, "trust/narrow", ["0"])
        _has(problems, r, "trust/narrow", "nproc=2")
        _has(problems, r, "trust/narrow", "E=unset")
        _exit_is(problems, sc, "trust/pin", ["0"])
        r = _exit_is(problems, sc, "trust/ok", ["0"])
        for want in ("top-secret", "E=hunter2", "CLAUDE-OK"):
            _has(problems, r, "trust/ok", want)
        r = _exit_is(problems, sc, "trust/edit", ["0"])
        edited = r is not None and any("EDIT=ok" in l for l in _lines(r))
        after = sc.runs.get("trust/after")
        changed = after is not None and "changed" == after.results().get("file")
        if after is None or after.exit is None:
            problems.append("trust/after: did not run")
        elif edited or changed:
            errs = [l for _, l in after.err if l.strip()]
            if after.exit == "0" or not any("changed since you trusted it" in l for l in errs):
                problems.append(f"trust/after: the guest changed the pinned file, yet exit {after.exit}: {errs[:2]}")
        elif after.exit != "0":
            problems.append(f"trust/after: the file is unchanged (the guest's edit was refused) but exit {after.exit}")
        _exit_is(problems, sc, "trust/revoke", ["0"])
        info.append(f"refused in one line before booting ({keys}); sizes alone ran; pinned file ran with secret, env "
                    f"and credentials; guest edit {'refused' if not (edited or changed) else 'made the next run refuse'}"
                    f"; revoke refused again")
    elif n == "protected-paths":
        r = _exit_is(problems, sc, "protected-paths", ["0"])
        _has(problems, r, "protected-paths", "protected-done")
        warn = [l for _, l in (r.err if r else []) if "aivmm: warning: the guest set" in l]
        if not any("core.fsmonitor" in l and "sub/.git/config" in l for l in warn):
            problems.append(f"protected-paths: no stop-time warning of sub/.git/config's core.fsmonitor "
                            f"(stderr: {_lines_err(r)})")
        info.append(f"EROFS for config, hook, aivmm.toml, .envrc (renames over them too); git commit worked; "
                    f"L1's git ran nothing planted; reported: {warn[0].strip() if warn else 'nothing'}")
    elif n == "agent-hostile":
        seen = []
        for m in ("oversized", "unknown", "truncated"):
            tag = f"agent-hostile/{m}"
            r = _exit_is(problems, sc, tag, None)
            if r is None or r.exit is None:
                continue
            errs = [l for _, l in r.err if l.startswith("aivmm: error:")]
            before = len(problems)
            if r.exit == "0":
                problems.append(f"{tag}: exit 0 after a hostile agent")
            if len(errs) != 1:
                problems.append(f"{tag}: want one `aivmm: error:` line, got {errs[:3]}")
            vmlog = _lines(sc.runs.get(f"{tag}/vmlog"))
            log = [l for l in vmlog if "closing the guest agent" in l]
            if not log:
                problems.append(f"{tag}: aivmm.log names no closed agent connection")
            else:
                seen.append(f"{m}: {log[0].split('closing', 1)[1].strip()[:90]}")
            # The VM went on after the close and stopped cleanly.
            if not any("the VM ended after its agent's connection was closed: PowerOff" in l for l in vmlog):
                problems.append(f"{tag}: aivmm.log shows no clean power-off after the close: {vmlog[-2:]}")
            con = _lines(sc.runs.get(f"{tag}/console"))
            if not any(f"hostile {m}:" in l and "host closed" in l for l in con):
                problems.append(f"{tag}: the guest's console does not show its agent seeing the close: {con[-4:]}")
            if not any("aivmm-init: powering off" in l for l in con):
                problems.append(f"{tag}: the guest's init did not power off cleanly: {con[-4:]}")
            if len(problems) > before:
                # What the run itself said: its error line, or its last stderr lines.
                problems.append(f"{tag}: exit {r.exit} after {r.wall_ms} ms: {errs[:1] or _lines_err(r)}")
        f = sc.runs.get("agent-hostile/flood")
        res = f.results() if f else {}
        if res.get("rc") != "0" or int(res.get("bytes", "0") or 0) < (256 << 20):
            problems.append(f"agent-hostile/flood: rc={res.get('rc')} bytes={res.get('bytes')}, want 0 and 256 MiB")
        info.append("; ".join(seen) + "; each time the guest saw the close and powered off cleanly"
                    + f"; flood: {res.get('bytes')} bytes relayed in {res.get('seconds')} s")
    elif n == "long-work":
        r = _exit_is(problems, sc, "long-work", ["0"])
        _has(problems, r, "long-work", "long-done")
        done = next((l for l in _lines(r) if l.startswith("long-done")), "")
        if r:
            info.append(f"{done.strip()}; outputs, sums and git checked in L1; aivmm exit after {r.wall_ms} ms")
    elif n == "terminal":
        r = sc.runs.get("terminal")
        sizes = [l.split(":", 1)[1].strip() for l in _lines(r) if l.startswith("pane size")]
        info.append(f"prompt, typed input answered, stty size {' -> '.join(sizes)} after tmux resize-window "
                    f"(and the WINCH trap ran), Ctrl-C -> 130, exit 7 came through")
    if problems:
        return False, "; ".join(problems), info
    return True, "; ".join(info), []
