/*
 * pycni's native shim: the same job as the Python shim (pycni/agent/shim.py),
 * without starting an interpreter on the warm path.
 *
 * The package build compiles this file (setup.py's build_shim step) into
 * pycni/agent/pycni-shim; `pycni install` copies that binary to <bin dir>/pycni-shim
 * (or compiles this file there when the package carries no current build) and
 * writes each plugin as a small text file whose "#!" line names that binary. The kernel then runs `pycni-shim <plugin file> [args]`; the plugin
 * file holds the settings as key=value lines (socket, version, python,
 * target, current, answer), so one binary serves every plugin and
 * `registry.own_plugin` still recognises the file by its tag line.
 *
 * What it does, in the Python shim's order and with its messages:
 *   - VERSION is answered from the file (the answer is hex-encoded there);
 *   - no CNI_COMMAND, PYCNI_NO_AGENT set, or no socket: the plugin runs cold;
 *   - the socket must be root's, in a directory of root's that no group or
 *     other user may write to (nor any directory above it, unless sticky);
 *     otherwise cold, saying why on stderr;
 *   - connect to the agent (5 s); failing that, cold, saying why on stderr;
 *     the process serving the socket must be root (SO_PEERCRED), else cold;
 *   - read stdin, no further than 16 MiB: a request larger than the agent
 *     takes runs cold, with all of stdin handed over (what was read, then
 *     the rest, fed through a pipe);
 *   - send the request (protocol v1, see pycni/agent/protocol.py) with this
 *     process's network namespace as an SCM_RIGHTS descriptor, and CNI_NETNS
 *     opened O_PATH when it can be (the agent works on that descriptor, and
 *     refuses a request whose CNI_NETNS it did not get: then this runs cold);
 *   - R (refused, also after A: nothing of the request remains) or the
 *     connection closed before A: cold, stdin handed over;
 *   - A (accepted): wait up to the agent's timeout + 5 s for D, relay its
 *     stderr, stdout and exit code byte for byte; otherwise a code-11
 *     "try again" error. Accepted work never runs twice.
 * Cold means exec'ing `<python> -I -c "from <module> import <function>; ..."`
 * with the environment untouched and, if stdin was already read, the same
 * bytes on stdin again (a memfd).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <limits.h>
#include <unistd.h>

#define CONNECT_TIMEOUT 5
#define ACCEPT_WAIT 120
#define ANSWER_MARGIN 5
#define MAX_FILE (64 * 1024)
#define MAX_FRAME (16u * 1024 * 1024)
#define MAX_BODY MAX_FRAME /* protocol.MAX_BODY: the largest request the agent takes */
static const char MAGIC[8] = {'P', 'Y', 'C', 'N', 'I', 'A', 0, 1};
/* Both builds define PYCNI_SHIM_SOURCE as the SHA-256 (first 16 hex digits) of this file, so that
 * `pycni install` can tell a binary built from this very source from a stale one. */
#ifndef PYCNI_SHIM_SOURCE
#define PYCNI_SHIM_SOURCE "unknown"
#endif
/* `pycni install` recognises its own binary by this string (kept in the binary: "used"). */
__attribute__((used)) static const char IDENT[] = "pycni-native-shim v1 source " PYCNI_SHIM_SOURCE;

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static struct settings {
    char plugin_type[64];
    char socket_path[108];
    char version[128];
    char python[4096];
    char module[512];
    char function[128];
    char current[32];
    char *answer;   /* decoded VERSION answer, or NULL */
    size_t answer_len;
} cfg;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("pycni-shim: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    _exit(1);
}

static void put(struct buf *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            die("out of memory");
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_u32(struct buf *b, uint32_t v) {
    unsigned char be[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, be, 4);
}

static void field(struct buf *b, const void *p, size_t n) {
    put_u32(b, (uint32_t)n);
    put(b, p, n);
}

static void out(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

static int hexval(int c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static void copy_value(char *dst, size_t size, const char *key, const char *val, size_t n) {
    if (n >= size)
        die("%s is too long in the plugin file", key);
    memcpy(dst, val, n);
    dst[n] = 0;
}

/* The plugin file: "#" lines, then key=value lines. */
static void load(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("cannot open the plugin file %s: %s (run me through a plugin file `pycni install` wrote)",
            path, strerror(errno));
    static char text[MAX_FILE + 1];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, text + len, MAX_FILE - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len == MAX_FILE)
            die("the plugin file %s is larger than %d bytes", path, MAX_FILE);
    }
    close(fd);
    text[len] = 0;
    char *line = text;
    while (line < text + len) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        size_t n = nl ? (size_t)(nl - line) : strlen(line);
        char *eq = memchr(line, '=', n);
        if (line[0] != '#' && eq) {
            size_t klen = (size_t)(eq - line), vlen = n - klen - 1;
            const char *val = eq + 1;
            static const struct {
                const char *key;
                size_t offset, size;
            } text_keys[] = {
                {"type", offsetof(struct settings, plugin_type), sizeof cfg.plugin_type},
                {"socket", offsetof(struct settings, socket_path), sizeof cfg.socket_path},
                {"version", offsetof(struct settings, version), sizeof cfg.version},
                {"python", offsetof(struct settings, python), sizeof cfg.python},
                {"module", offsetof(struct settings, module), sizeof cfg.module},
                {"function", offsetof(struct settings, function), sizeof cfg.function},
                {"current", offsetof(struct settings, current), sizeof cfg.current},
            };
            int known = 0;
            for (size_t k = 0; k < sizeof text_keys / sizeof text_keys[0] && !known; k++) {
                if (klen == strlen(text_keys[k].key) && memcmp(line, text_keys[k].key, klen) == 0) {
                    copy_value((char *)&cfg + text_keys[k].offset, text_keys[k].size, text_keys[k].key, val, vlen);
                    known = 1;
                }
            }
            if (!known && klen == 6 && memcmp(line, "answer", 6) == 0 && vlen % 2 == 0 && vlen > 0) {
                cfg.answer = malloc(vlen / 2);
                if (!cfg.answer)
                    die("out of memory");
                for (size_t i = 0; i < vlen / 2; i++) {
                    int hi = hexval(val[2 * i]), lo = hexval(val[2 * i + 1]);
                    if (hi < 0 || lo < 0)
                        die("the VERSION answer in %s is not hex", path);
                    cfg.answer[i] = (char)(hi << 4 | lo);
                }
                cfg.answer_len = vlen / 2;
            }
        }
        line += n + 1;
    }
    if (!cfg.plugin_type[0] || !cfg.python[0] || !cfg.module[0] || !cfg.function[0] || !cfg.version[0])
        die("%s lacks type, version, python, module or function: write it again with `pycni install`", path);
}

/* stdin for a cold run that must see `data` and then what is left of this process's stdin: a pipe that a
 * child fills (it exits at the end, or when the plugin stops reading). */
static void feed_rest(const struct buf *data) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        close(p[0]);
        close(1);  /* the runtime waits for the plugin's stdout to close: not for this child's */
        close(2);
        out(p[1], data->data, data->len);
        char chunk[65536];
        for (;;) {
            ssize_t r = read(0, chunk, sizeof chunk);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            out(p[1], chunk, (size_t)r);
        }
        _exit(0);
    }
    close(p[1]);
    if (dup2(p[0], 0) < 0)
        die("cannot hand stdin over: %s", strerror(errno));
    close(p[0]);
}

/* Run the plugin in this process's place: the Python shim's cold path. `more`: stdin was not read to its end. */
static void cold_rest(const char *note, const struct buf *data, int more) {
    if (note) {
        char line[1024];
        int n = snprintf(line, sizeof line, "pycni: %s; running %s in-process\n", note, cfg.plugin_type);
        if (n > 0)
            out(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    }
    if (data && more) {
        feed_rest(data);
    } else if (data) {
        int mfd = memfd_create("pycni-stdin", MFD_CLOEXEC);
        if (mfd < 0)
            die("memfd_create: %s", strerror(errno));
        out(mfd, data->data, data->len);
        if (lseek(mfd, 0, SEEK_SET) != 0 || dup2(mfd, 0) < 0)
            die("cannot hand stdin over: %s", strerror(errno));
        close(mfd);
    }
    char code[1024];
    snprintf(code, sizeof code, "import sys\nfrom %s import %s\nsys.exit(%s())", cfg.module, cfg.function,
             cfg.function);
    char *argv[] = {cfg.python, "-I", "-c", code, NULL};
    execve(cfg.python, argv, environ);
    die("cannot run %s: %s", cfg.python, strerror(errno));
}

static void cold(const char *note, const struct buf *data) {
    cold_rest(note, data, 0);
}

/* Why the socket at `path` may not be the agent's, into `why` (empty: it may, or nothing is there).
 * The same checks as the Python shim's unsafe() and pycni.agent.protocol.unsafe_socket. */
static void unsafe_socket(const char *path, char *why, size_t size) {
    struct stat st;
    why[0] = 0;
    if (lstat(path, &st) < 0)
        return; /* nothing (visible) there: connecting says so */
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(why, size, "%s is not a socket", path);
        return;
    }
    if (st.st_uid != 0) {
        snprintf(why, size, "%s belongs to uid %u, not root", path, (unsigned)st.st_uid);
        return;
    }
    char parent[PATH_MAX], dir[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", path);
    char *slash = strrchr(parent, '/');
    if (!slash)
        return;
    if (slash == parent)
        slash[1] = 0;
    else
        *slash = 0;
    if (!realpath(parent, dir))
        return;
    for (int leaf = 1;; leaf = 0) {
        if (lstat(dir, &st) < 0)
            return;
        if (st.st_uid != 0) {
            snprintf(why, size, "%s belongs to uid %u, not root", dir, (unsigned)st.st_uid);
            return;
        }
        if ((st.st_mode & 022) && (leaf || !(st.st_mode & S_ISVTX))) {
            snprintf(why, size, "%s is writable by group or others (mode %04o)", dir, (unsigned)(st.st_mode & 07777));
            return;
        }
        if (strcmp(dir, "/") == 0)
            return;
        slash = strrchr(dir, '/');
        if (slash == dir)
            slash[1] = 0;
        else
            *slash = 0;
    }
}

static void try_again(const char *version, size_t vlen, const char *msg) {
    static const char head[] = "{\n    \"cniVersion\": ", mid[] = ",\n    \"code\": 11,\n    \"msg\": \"",
                      tail[] = "\"\n}\n";
    struct buf b = {0};
    put(&b, head, sizeof head - 1);
    put(&b, version, vlen);
    put(&b, mid, sizeof mid - 1);
    put(&b, msg, strlen(msg));
    put(&b, tail, sizeof tail - 1);
    out(1, b.data, b.len);
    _exit(1);
}

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The request's "cniVersion" as a JSON string (quotes included), for a try-again error. */
static void try_again_for(const struct buf *data, const char *msg) {
    static const char key[] = "\"cniVersion\"";
    const char *p = data->len ? memmem(data->data, data->len, key, sizeof key - 1) : NULL;
    if (p) {
        const char *end = data->data + data->len, *r = p + sizeof key - 1;
        while (r < end && is_space(*r))
            r++;
        while (r < end && *r == ':')
            r++;
        while (r < end && is_space(*r))
            r++;
        if (r < end && *r == '"') {
            const char *q = memchr(r + 1, '"', (size_t)(end - r - 1));
            if (q && q - r < 32 && !memchr(r, '\\', (size_t)(q - r)))
                try_again(r, (size_t)(q - r + 1), msg);
        }
    }
    char fallback[40];
    int n = snprintf(fallback, sizeof fallback, "\"%s\"", cfg.current[0] ? cfg.current : "1.1.0");
    try_again(fallback, (size_t)n, msg);
}

static void set_timeout(int s, int which, long seconds) {
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
    setsockopt(s, SOL_SOCKET, which, &tv, sizeof tv);
}

/* Read exactly n bytes: 0 on success, -1 with errno (0 for EOF). */
static int recv_all(int s, char *p, size_t n) {
    while (n > 0) {
        ssize_t r = recv(s, p, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = 0;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

struct frame {
    char kind;
    char *body;
    uint32_t len;
    const char *item[4];
    uint32_t item_len[4];
    int items;
};

/* One answer frame: kind byte, u32 length, length-prefixed fields. 0, or -1 with errno (0: EOF/garbage). */
static int read_frame(int s, struct frame *f) {
    unsigned char head[5];
    if (recv_all(s, (char *)head, 5) < 0)
        return -1;
    f->kind = (char)head[0];
    f->len = (uint32_t)head[1] << 24 | (uint32_t)head[2] << 16 | (uint32_t)head[3] << 8 | head[4];
    if (f->len > MAX_FRAME) {
        errno = 0;
        return -1;
    }
    f->body = malloc(f->len ? f->len : 1);
    if (!f->body)
        die("out of memory");
    if (recv_all(s, f->body, f->len) < 0)
        return -1;
    f->items = 0;
    for (uint32_t i = 0; i + 4 <= f->len && f->items < 4;) {
        const unsigned char *p = (const unsigned char *)f->body + i;
        uint32_t n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        if (n > f->len - i - 4)
            break;
        f->item[f->items] = f->body + i + 4;
        f->item_len[f->items++] = n;
        i += 4 + n;
    }
    return 0;
}

static const char *error_class(int err) {
    switch (err) {
    case 0:
        return "EOFError";
    case ECONNRESET:
        return "ConnectionResetError";
    case EPIPE:
        return "BrokenPipeError";
    default:
        return "OSError";
    }
}

int main(int argc, char **argv) {
    if (argc < 2)
        die("I am the shim behind the plugins `pycni install` writes; run a plugin, not me");
    load(argv[1]);

    const char *command = getenv("CNI_COMMAND");
    if (command && strcmp(command, "VERSION") == 0 && cfg.answer) {
        out(1, cfg.answer, cfg.answer_len);
        _exit(0);
    }
    if (!command || !command[0] || getenv("PYCNI_NO_AGENT") || !cfg.socket_path[0])
        cold(NULL, NULL);
    char why[PATH_MAX + 100];
    unsafe_socket(cfg.socket_path, why, sizeof why);
    if (why[0]) {
        char note[sizeof why + 200];
        snprintf(note, sizeof note, "not using the agent socket %s: %s", cfg.socket_path, why);
        cold(note, NULL);
    }

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        cold("cannot create a unix socket", NULL);
    set_timeout(s, SO_SNDTIMEO, CONNECT_TIMEOUT);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, cfg.socket_path, strlen(cfg.socket_path));
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int err = errno;
        char note[300];
        snprintf(note, sizeof note, "agent not reached at %s (%s)", cfg.socket_path,
                 err == EAGAIN || err == EINPROGRESS || err == ETIMEDOUT ? "timed out" : strerror(err));
        close(s);
        cold(note, NULL);
    }
    struct ucred peer;
    socklen_t peer_len = sizeof peer;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) < 0 || peer.uid != 0) {
        char note[300];
        snprintf(note, sizeof note, "not using the agent socket %s: the process serving it is not root (uid %d)",
                 cfg.socket_path, peer_len == sizeof peer ? (int)peer.uid : -1);
        close(s);
        cold(note, NULL);
    }

    struct buf data = {0};
    while (data.len <= MAX_BODY) {
        char chunk[65536];
        ssize_t r = read(0, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            close(s);
            cold(NULL, NULL);  /* the plugin reads stdin again and reports the failure as it always does */
        }
        if (r == 0)
            break;
        put(&data, chunk, (size_t)r);
    }

    struct buf env = {0};
    int first = 1;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) != 0 && strncmp(*e, "PYCNI_", 6) != 0)
            continue;
        if (!first)
            put(&env, "", 1);
        put(&env, *e, strlen(*e));
        first = 0;
    }
    size_t body_len = 5 * 4 + strlen(cfg.version) + 3 + strlen(cfg.plugin_type) + env.len + data.len;
    if (data.len > MAX_BODY || body_len > MAX_BODY) {
        close(s);
        char note[100];
        snprintf(note, sizeof note, "the request is larger than the agent takes (%u MiB)", MAX_BODY >> 20);
        cold_rest(note, &data, data.len > MAX_BODY);
    }
    struct buf msg = {0};
    put(&msg, MAGIC, sizeof MAGIC);
    struct buf body = {0};
    field(&body, cfg.version, strlen(cfg.version));
    field(&body, "cni", 3);
    field(&body, cfg.plugin_type, strlen(cfg.plugin_type));
    field(&body, env.data, env.len);
    field(&body, data.data, data.len);
    put_u32(&msg, (uint32_t)body.len);
    put(&msg, body.data, body.len);

    struct frame f;
    int failed = 0, err = 0;
    int ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (ns < 0) {
        failed = 1;
        err = errno;
    } else {
        /* What CNI_NETNS is here goes along: the agent runs the request only if it sees the same there. */
        int fds[2] = {ns, -1}, nfds = 1;
        const char *target = getenv("CNI_NETNS");
        if (target && target[0] && (fds[1] = open(target, O_PATH | O_CLOEXEC)) >= 0)
            nfds = 2;
        char control[CMSG_SPACE(2 * sizeof(int))];
        memset(control, 0, sizeof control);
        struct iovec iov = {.iov_base = msg.data, .iov_len = msg.len};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                            .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
        ssize_t sent;
        do
            sent = sendmsg(s, &mh, MSG_NOSIGNAL);
        while (sent < 0 && errno == EINTR);
        size_t done = sent > 0 ? (size_t)sent : 0;
        while (sent >= 0 && done < msg.len) {
            sent = send(s, msg.data + done, msg.len - done, MSG_NOSIGNAL);
            if (sent < 0 && errno == EINTR) {
                sent = 0;
                continue;
            }
            if (sent > 0)
                done += (size_t)sent;
        }
        if (sent < 0) {
            failed = 1;
            err = errno;
        }
        close(ns);
        if (nfds == 2)
            close(fds[1]);
    }
    if (!failed) {
        set_timeout(s, SO_RCVTIMEO, ACCEPT_WAIT);
        if (read_frame(s, &f) < 0) {
            failed = 1;
            err = errno;
        }
    }
    if (failed) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            try_again_for(&data, "the pycni agent did not accept the request in time; try again later");
        close(s);
        char note[200];
        snprintf(note, sizeof note, "the agent closed the connection before accepting the request (%s)",
                 error_class(err));
        cold(note, &data);
    }
    if (f.kind == 'A') {
        const char *version = "\"1.1.0\"";
        size_t vlen = strlen(version);
        long timeout = 60;
        if (f.items >= 2) {
            char seconds[32];
            size_t n = f.item_len[0] < sizeof seconds - 1 ? f.item_len[0] : sizeof seconds - 1;
            memcpy(seconds, f.item[0], n);
            seconds[n] = 0;
            timeout = (long)(strtod(seconds, NULL) + 0.999);
            version = f.item[1];
            vlen = f.item_len[1];
        }
        set_timeout(s, SO_RCVTIMEO, timeout + ANSWER_MARGIN);
        struct frame done_frame;
        if (read_frame(s, &done_frame) < 0) {
            char v[64];
            size_t n = vlen < sizeof v ? vlen : sizeof v - 1;
            memcpy(v, version, n);
            try_again(v, n, "the pycni agent did not answer (it timed out, stopped or restarted); try again");
        }
        f = done_frame;
    }
    if (f.kind == 'R') { /* also after A: nothing of the request remains */
        close(s);
        char note[600];
        int n = f.items > 0 ? (int)(f.item_len[0] < 500 ? f.item_len[0] : 500) : 0;
        snprintf(note, sizeof note, "the agent refused the request (%.*s)", n, n ? f.item[0] : "");
        cold(note, &data);
    }
    if (f.kind != 'D' || f.items < 3)
        try_again_for(&data, "unexpected answer from the pycni agent; try again");
    char code[16];
    size_t n = f.item_len[0] < sizeof code - 1 ? f.item_len[0] : sizeof code - 1;
    memcpy(code, f.item[0], n);
    code[n] = 0;
    out(2, f.item[2], f.item_len[2]);
    out(1, f.item[1], f.item_len[1]);
    _exit(atoi(code));
}
