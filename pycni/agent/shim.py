"""The plugin executables `pycni install` writes: tiny shims in front of the agent.

A shim runs as ``#!PYTHON -IS`` (isolated, no ``site``) and on its warm path
touches only modules the interpreter has already loaded or builds in
(``posix``, ``sys``, ``_socket``): no json, no struct, no pycni. It

- answers VERSION itself (the answer is embedded when it is written);
- talks only to an agent it can trust: the socket must be root's, in a
  directory of root's that no group or other user may write to (nor any
  directory above it, unless sticky), and the process serving it must be
  root (SO_PEERCRED); otherwise it runs the plugin in-process and says why
  in one line on stderr (``protocol.unsafe_socket`` is the same check);
- connects to the agent's socket; if that fails (missing, refused, timed
  out: nothing was sent), runs the plugin in-process exactly like the launcher
  before the agent existed (``site.main()`` first: ``-S`` skipped
  site-packages), saying so in one line on stderr;
- never sends a request over ``protocol.MAX_BODY`` (16 MiB; stdin is read no
  further than that): such a request runs in-process, stdin handed over whole;
- otherwise sends its version, plugin type, CNI_* / PYCNI_* environment,
  stdin and its network namespace (``/proc/thread-self/ns/net`` over
  SCM_RIGHTS, followed by CNI_NETNS opened O_PATH when it can be: the agent
  works on that descriptor, and refuses a request with a CNI_NETNS it could
  not open), and relays the agent's exit code, stdout and stderr byte for
  byte. A request the agent refuses (another pycni version, an unknown
  plugin, an executable outside the agent's --cni-bin-dir directories; also
  once accepted, after the plugin undid its work) or closes before accepting
  has not run or left nothing behind: the shim runs it in-process.
  Once the agent has accepted a request the shim waits for its answer up to
  the agent's timeout and otherwise prints a "try again later" (code 11)
  error: the same work never runs twice.

``PYCNI_NO_AGENT=1`` in the environment skips the agent (silently); the agent
sets it for the plugins its requests execute, so a delegated shim never calls
back into the agent that is waiting for it.
"""

from __future__ import annotations

from cni_plugins.spec.skel import Outcome

from . import protocol

# How long a shim waits for the agent to accept a request (queued behind others)
# before it gives up with "try again later"; the agent answers "busy" long before.
ACCEPT_WAIT = 120.0
# What a shim adds to the agent's announced request timeout before it stops waiting.
ANSWER_MARGIN = 5.0
CONNECT_TIMEOUT = 5.0

# The shim's text. Placeholders in {{ }} are filled by ``script``; everything else is
# literal Python, kept small because it is compiled on every call.
_TEMPLATE = """\
#!{{python}} -IS
{{marker}}
# pycni-plugin: {{plugin_type}}
# Warm: the request goes to `pycni agent` ({{socket_comment}}). Cold, when the agent
# cannot be reached: {{module}}:{{function}} runs in this process.
import posix, sys, _socket
T = {{plugin_type_bytes}}
V = {{version_bytes}}
S = {{socket_path}}
VERSION_ANSWER = {{version_answer}}
MAX = {{max_body}}


def cold(note, data=None, more=False):
    if note:
        posix.write(2, ("pycni: %s; running %s in-process\\n" % (note, T.decode())).encode("utf-8", "replace"))
    import site
    site.main()
    if data is not None:
        import io
        stream = head = io.BytesIO(data)
        if more:  # stdin was not read to its end: what was read, then the rest
            class Rest(io.RawIOBase):
                def readable(self):
                    return True

                def readinto(self, b):
                    n = head.readinto(b)
                    if n:
                        return n
                    c = posix.read(0, len(b))
                    b[:len(c)] = c
                    return len(c)

            stream = io.BufferedReader(Rest(), 1 << 20)
        sys.stdin = io.TextIOWrapper(stream)
    from {{module}} import {{function}}
    sys.exit({{function}}())


def out(fd, data):
    while data:
        data = data[posix.write(fd, data):]


def try_again(version, msg):
    out(1, b'{\\n    "cniVersion": ' + version + b',\\n    "code": 11,\\n    "msg": "' + msg + b'"\\n}\\n')
    posix._exit(1)


def config_version(data):
    i = data.find(b'"cniVersion"')
    if i >= 0:
        rest = data[i + 12:].lstrip().lstrip(b":").lstrip()
        end = rest.find(b'"', 1)
        if rest[:1] == b'"' and 0 < end < 32 and b"\\\\" not in rest[:end]:
            return rest[:end + 1]
    return b'"{{current_version}}"'


def real(p):  # os.path.realpath, without importing os
    done, todo, links = "", p.split("/"), 0
    while todo:
        c = todo.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            done = done[:done.rfind("/")]
            continue
        try:
            t = posix.readlink(done + "/" + c)
        except OSError:
            done += "/" + c
            continue
        links += 1
        if links > 40:
            raise OSError("too many symbolic links")
        todo = t.split("/") + todo
        if t[:1] == "/":
            done = ""
    return done or "/"


def unsafe(p):  # why the socket at p may not be the agent's ("" when it is, or when it is missing)
    try:
        st = posix.lstat(p)
        if st.st_mode & 0o170000 != 0o140000:
            return "%s is not a socket" % p
        if st.st_uid:
            return "%s belongs to uid %d, not root" % (p, st.st_uid)
        d = real(p[:p.rfind("/")] or "/")
        leaf = True
        while True:
            st = posix.lstat(d)
            if st.st_uid:
                return "%s belongs to uid %d, not root" % (d, st.st_uid)
            if st.st_mode & 0o022 and (leaf or not st.st_mode & 0o1000):
                return "%s is writable by group or others (mode %04o)" % (d, st.st_mode & 0o7777)
            if d == "/":
                return ""
            d, leaf = d[:d.rfind("/")] or "/", False
    except OSError:
        return ""  # nothing (visible) there: connecting says so


def recv(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(min(n - len(b), 1 << 20))
        if not c:
            raise EOFError
        b += c
    return b


def frame(s):
    h = recv(s, 5)
    n = int.from_bytes(h[1:], "big")
    if n > MAX:
        raise EOFError
    body = recv(s, n)
    items, i = [], 0
    while i < len(body):
        n = int.from_bytes(body[i:i + 4], "big")
        items.append(body[i + 4:i + 4 + n])
        i += 4 + n
    return h[:1], items


def f(b):
    return len(b).to_bytes(4, "big") + b


env = posix.environ
command = env.get(b"CNI_COMMAND")
if command == b"VERSION" and VERSION_ANSWER:
    out(1, VERSION_ANSWER)
    posix._exit(0)
if not command or env.get(b"PYCNI_NO_AGENT") or not S:
    cold(None)
why = unsafe(S)
if why:
    cold("not using the agent socket %s: %s" % (S, why))
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
s.settimeout({{connect_timeout}})
try:
    s.connect(S)
    uid = int.from_bytes(s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)[4:8], sys.byteorder)
except OSError as e:
    cold("agent not reached at %s (%s)" % (S, e.strerror or e))
if uid:
    s.close()
    cold("not using the agent socket %s: the process serving it is not root (uid %d)" % (S, uid))
chunks, size = [], 0
try:
    while size <= MAX:
        c = posix.read(0, 65536)
        if not c:
            break
        chunks.append(c)
        size += len(c)
except OSError:
    s.close()
    cold(None)  # the plugin reads stdin again and reports the failure as it always does
data = b"".join(chunks)
E = b"\\0".join(k + b"=" + v for k, v in env.items() if k[:4] == b"CNI_" or k[:6] == b"PYCNI_")
if size > MAX or len(data) + len(E) + len(V) + len(T) + 23 > MAX:
    s.close()
    cold("the request is larger than the agent takes (%d MiB)" % (MAX >> 20), data, size > MAX)
body = f(V) + f(b"cni") + f(T) + f(E) + f(data)
try:
    fds = [posix.open("/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)]
    p = env.get(b"CNI_NETNS")
    if p:
        try:  # what CNI_NETNS is here: the agent works on this descriptor, never on the path
            fds.append(posix.open(p, posix.O_PATH | posix.O_CLOEXEC))
        except OSError:
            pass
    msg = {{magic}} + len(body).to_bytes(4, "big") + body
    sent = s.sendmsg([msg], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                              b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
    if sent < len(msg):
        s.sendall(msg[sent:])
    s.settimeout({{accept_wait}})
    kind, a = frame(s)
except TimeoutError:
    try_again(config_version(data), b"the pycni agent did not accept the request in time; try again later")
except (OSError, EOFError) as e:
    s.close()
    cold("the agent closed the connection before accepting the request (%s)" % (e.__class__.__name__,), data)
if kind == b"A":
    version = a[1]
    try:
        s.settimeout(float(a[0]) + {{answer_margin}})
        kind, a = frame(s)
    except (OSError, EOFError):
        try_again(version, b"the pycni agent did not answer (it timed out, stopped or restarted); try again")
if kind == b"R":  # also after A: nothing of the request remains
    s.close()
    cold("the agent refused the request (%s)" % a[0].decode("utf-8", "replace"), data)
if kind != b"D":
    try_again(config_version(data), b"unexpected answer from the pycni agent; try again")
out(2, a[2])
out(1, a[1])
posix._exit(int(a[0]))
"""


def render(outcome: Outcome) -> tuple[int, bytes, bytes]:
    """Exit code, stdout and stderr bytes exactly as ``skel.plugin_main`` writes an Outcome."""
    stdout = outcome.stdout
    if stdout and not stdout.endswith("\n"):
        stdout += "\n"
    return (
        outcome.exit_code,
        stdout.encode("utf-8", "surrogateescape"),
        outcome.stderr.encode("utf-8", "backslashreplace"),
    )


def version_answer(plugin_type: str) -> bytes | None:
    """What the plugin prints for VERSION, computed once by the plugin's own code (None: not one of ours)."""
    from cni_plugins.spec import registry
    from cni_plugins.spec.skel import dispatch

    if plugin_type not in registry.PACKAGES:
        return None
    outcome = dispatch(registry.funcs(plugin_type), {"CNI_COMMAND": "VERSION"}, b"")
    code, stdout, _ = render(outcome)
    if code != 0:
        raise RuntimeError(f"{plugin_type} VERSION failed: {stdout!r}")
    return stdout


NATIVE_SOURCE = "native_shim.c"
NATIVE_IDENT = b"pycni-native-shim v1"  # the string native_shim.c keeps in its binary


def native_script(
    plugin_type: str,
    target: str,
    python: str,
    marker: str,
    shim_binary: str,
    socket_path: str,
    version: str | None = None,
) -> str:
    """The plugin file for the native shim: a "#!" line naming ``shim_binary``, then its settings.

    The binary (compiled from native_shim.c) reads them from this file; its
    warm and cold paths are this module's, in C. ``socket_path`` must be set:
    a shim without an agent is the Python one (``script``).
    """
    from cni_plugins.spec.version import CURRENT_VERSION

    module, _, function = target.partition(":")
    answer = version_answer(plugin_type)
    settings = {
        "type": plugin_type,
        "socket": socket_path,
        "version": version or protocol.pycni_version(),
        "python": python,
        "module": module,
        "function": function,
        "current": CURRENT_VERSION,
        "answer": answer.hex() if answer else "",
    }
    for key, value in settings.items():
        if "\n" in value or "\0" in value:
            raise ValueError(f"the native shim's {key} cannot hold a newline or NUL: {value!r}")
    lines = [
        f"#!{shim_binary}",
        marker,
        f"# pycni-plugin: {plugin_type}",
        f"# Warm: {shim_binary} (pycni's native shim) sends the request to `pycni agent` (socket",
        f"# {socket_path}). Cold, when the agent cannot be reached: {target} runs under {python}.",
    ]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def script(
    plugin_type: str, target: str, python: str, marker: str, socket_path: str | None, version: str | None = None
) -> str:
    """The shim's source for ``plugin_type`` (``target`` is its cold entry point, "module:function").

    ``socket_path`` None writes a shim that never tries an agent (cold only).
    """
    from cni_plugins.spec.version import CURRENT_VERSION

    module, _, function = target.partition(":")
    values = {
        "python": python,
        "marker": marker,
        "plugin_type": plugin_type,
        "socket_comment": f"socket {socket_path}" if socket_path else "disabled at install",
        "module": module,
        "function": function,
        "plugin_type_bytes": repr(plugin_type.encode()),
        "version_bytes": repr((version or protocol.pycni_version()).encode()),
        "socket_path": repr(socket_path or ""),
        "version_answer": repr(version_answer(plugin_type)),
        "current_version": CURRENT_VERSION,
        "connect_timeout": repr(CONNECT_TIMEOUT),
        "accept_wait": repr(ACCEPT_WAIT),
        "answer_margin": repr(ANSWER_MARGIN),
        "max_body": repr(protocol.MAX_BODY),
        "magic": repr(protocol.MAGIC),
    }
    text = _TEMPLATE
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text
