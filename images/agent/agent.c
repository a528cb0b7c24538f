/*
 * vmsandbox guest agent: one static binary, two personalities chosen by argv[0].
 *
 * vsbx-agent PORT HOSTKEY [SERVER ARGV...]   (PID 1 after /init): reaps every orphan, and
 *     bridges the virtio-serial PORT to a fresh `dropbear -i` (or SERVER, for tests) per
 *     host connection. A virtio-serial port reports POLLHUP while no host end is connected;
 *     a session starts at the host's "SSH-" line (bytes before it are a gone connection's
 *     leftovers), runs until the host leaves or dropbear ended and its last bytes reached
 *     the port. Idle, the agent sleeps on a signalfd (SIGCHLD, and SIGIO for host
 *     connect/disconnect): it does not wake up at all (see images/README.md).
 *
 * vsbx-exec -c "vsbx1 TOKENS"   (root's login shell, run by dropbear for each exec): decodes
 *     hex tokens (a=argv element, e=KEY=VALUE, c=cwd, t=timeout ms, r=run in the guest root
 *     rather than the sandbox rootfs, p=supervise the daemon whose pid argv writes to this
 *     file, k=with p: keep it detached under PREFIX, w=rejoin the keeper of PREFIX,
 *     y=listen on this unix socket for the pty master crun sends for a terminal process,
 *     then pump it to and from our own stdio, u=run argv as NAME|UID[:GROUP|GID] of the
 *     root it runs in, resolved as runc does), chroots into /rootfs when it is mounted and
 *     execs argv directly, never through a shell. HUP INT QUIT USR1 USR2 TERM sent to it
 *     (dropbear's delivery of an SSH "signal") go on to argv's process group, so the exit
 *     code stays argv's; while supervising (p) a signal ends vsbx-exec as before. Exit code:
 *     the child's (or the supervised daemon's), or 128+signal.
 *
 * vsbx-agent reseed CLOCK_NS   (vsbx-setup, after a restore from a template): sets the clock
 *     to the host's CLOCK_NS (ns since the epoch), credits the 64 bytes of host entropy on
 *     stdin to the kernel's pool and forces a CRNG reseed, so no two guests restored from
 *     one template continue the same random stream. Reads exactly 64 bytes: the rest of
 *     stdin is for the next reader.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/random.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

/* SIGCHLD (reap) and SIGIO (the host end of the port connected or went away, or data came)
 * arrive on one signalfd, so the agent sleeps in poll() without a timeout while idle: no
 * periodic wake-ups of an idle guest. */
static int sigfd = -1;

static void reap(void) {
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

/* Consume pending signals from the signalfd and reap; a no-op when none is pending. */
static void take_signals(void) {
    struct signalfd_siginfo si;
    while (sigfd >= 0 && read(sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
    }
    reap();
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

struct pipebuf {
    char data[BUF];
    size_t len;
};

/* Move bytes from fd `from` into `b`; returns 0 on EOF/error, 1 otherwise. */
static int fill(int from, struct pipebuf *b) {
    ssize_t n = read(from, b->data + b->len, BUF - b->len);
    if (n > 0) {
        b->len += (size_t)n;
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 1;
    return 0;
}

static int drain(int to, struct pipebuf *b) {
    ssize_t n = write(to, b->data, b->len);
    if (n > 0) {
        memmove(b->data, b->data + n, b->len - (size_t)n);
        b->len -= (size_t)n;
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 1;
    return 0;
}

static pid_t spawn_server(int sock, char **server) {
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL); /* a blocked mask survives exec */
        signal(SIGPIPE, SIG_DFL);
        setsid();
        dup2(sock, 0);
        dup2(sock, 1);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        for (int fd = 3; fd < 64; fd++) close(fd);
        execv(server[0], server);
        _exit(127);
    }
    return pid;
}

/* Wait until the port or the signalfd is ready; returns the port's revents (0 on EINTR). */
static short wait_port(int port, short events) {
    struct pollfd p[2] = {{port, events, 0}, {sigfd, POLLIN, 0}};
    if (poll(p, 2, -1) < 0) return 0;
    if (p[1].revents) take_signals();
    return p[0].revents;
}

/* The start of a session: drop whatever precedes the client's "SSH-" identification line
 * (bytes a gone connection left in the port), keep everything from it on in `down`. A client
 * speaks first with its version line and never sends other lines before it (RFC 4253 4.2).
 * Returns 1 once found, 0 when the host went away first. */
static int await_client(int port, struct pipebuf *down) {
    static const char tag[] = "SSH-";
    size_t kept = 0; /* bytes of a tag prefix carried over at the end of the last read */
    for (;;) {
        short r = wait_port(port, POLLIN);
        if (r & (POLLHUP | POLLERR)) return 0; /* what is readable may be the next host's */
        if (!(r & POLLIN)) continue;
        char buf[4096];
        memcpy(buf, tag, kept);
        ssize_t n = read(port, buf + kept, sizeof buf - kept);
        if (n <= 0) continue;
        size_t len = kept + (size_t)n;
        for (size_t i = 0; i + 4 <= len; i++) {
            if (memcmp(buf + i, tag, 4) == 0) {
                memcpy(down->data, buf + i, len - i);
                down->len = len - i;
                return 1;
            }
        }
        /* Carry a trailing "S", "SS" or "SSH" into the next read. */
        kept = 0;
        for (size_t k = 3; k > 0; k--) {
            if (len >= k && memcmp(buf + len - k, tag, k) == 0) {
                kept = k;
                break;
            }
        }
    }
}

/* One host connection: run a server session until the host goes away or the server ended
 * and everything it wrote reached the port. */
static void session(int port, char **server) {
    static struct pipebuf up, down; /* up: server -> host, down: host -> server */
    up.len = down.len = 0;
    if (!await_client(port, &down)) return;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return;
    pid_t pid = spawn_server(sv[1], server);
    close(sv[1]);
    if (pid < 0) { /* never kill(-1) below: that would be every process */
        close(sv[0]);
        sleep_ms(100);
        return;
    }
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    int server_eof = 0, server_deaf = 0;
    /* Until the server closed its end and its last bytes are written to the port: the
     * tail of a session (an exit status, say) must not be lost. */
    while (!(server_eof && up.len == 0)) {
        short sv_events = (short)((!server_eof && up.len < BUF ? POLLIN : 0) |
                                  (!server_deaf && down.len ? POLLOUT : 0));
        struct pollfd p[3] = {
            {port, (short)((down.len < BUF && !server_deaf ? POLLIN : 0) | (up.len ? POLLOUT : 0)), 0},
            /* An fd with nothing to wait for stays out of the set: a hung-up socket would
             * report POLLHUP at once and spin the loop. */
            {sv_events ? sv[0] : -1, sv_events, 0},
            {sigfd, POLLIN, 0},
        };
        if (poll(p, 3, -1) < 0) {
            if (errno != EINTR) break;
            continue;
        }
        if (p[2].revents) take_signals();
        if (p[0].revents & (POLLHUP | POLLERR)) break; /* the host disconnected */
        if ((p[0].revents & POLLIN) && !fill(port, &down)) break;
        if ((p[1].revents & (POLLIN | POLLHUP | POLLERR)) && !server_eof && up.len < BUF && !fill(sv[0], &up))
            server_eof = 1;
        if ((p[0].revents & POLLOUT) && up.len && !drain(port, &up)) break;
        if ((p[1].revents & POLLOUT) && down.len && !drain(sv[0], &down)) {
            server_deaf = 1; /* it stopped reading; still take what it says */
            down.len = 0;
        }
        if (server_deaf) down.len = 0;
    }
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    close(sv[0]);
    /* Bytes still in the port belong to this connection; a new host's start with its own
     * "SSH-" line is found by the next await_client(). */
}

static int reseed_main(const char *clock_ns) {
    struct {
        int entropy_count;
        int buf_size;
        unsigned int buf[16];
    } pool = {512, 64, {0}};
    size_t got = 0;
    while (got < sizeof pool.buf) {
        ssize_t n = read(0, (char *)pool.buf + got, sizeof pool.buf - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            fprintf(stderr, "vsbx-agent reseed: short entropy on stdin\n");
            return 1;
        }
        got += (size_t)n;
    }
    char *end;
    long long ns = strtoll(clock_ns, &end, 10);
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    if (*end || ns <= 0 || clock_settime(CLOCK_REALTIME, &ts) != 0) {
        perror("vsbx-agent reseed: clock_settime");
        return 1;
    }
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &pool) != 0 || ioctl(fd, RNDRESEEDCRNG) != 0) {
        perror("vsbx-agent reseed: RNDADDENTROPY/RNDRESEEDCRNG");
        return 1;
    }
    close(fd);
    return 0;
}

static int agent_main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "reseed") == 0) return reseed_main(argv[2]);
    if (argc < 3) {
        fprintf(stderr, "usage: vsbx-agent PORT HOSTKEY [SERVER ARGV...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    char *dropbear[] = {"/usr/sbin/dropbear", "-i", "-s", "-r", argv[2], NULL};
    char **server = argc > 3 ? argv + 3 : dropbear;
    int port = open(argv[1], O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (port < 0 || sigfd < 0) {
        perror("vsbx-agent: open port");
        /* Stay PID 1 so the kernel does not panic; just reap. */
        for (;;) {
            sleep_ms(1000);
            reap();
        }
    }
    /* SIGIO when the host end connects or disconnects (virtio_console notifies a port's
     * fasync owner of both), so waiting for a host needs no polling loop. */
    fcntl(port, F_SETOWN, getpid());
    fcntl(port, F_SETFL, O_NONBLOCK | O_ASYNC);
    for (;;) {
        take_signals(); /* first: a SIGIO that comes after the port's check stays pending */
        struct pollfd p = {port, POLLIN, 0};
        int r = poll(&p, 1, 0);
        if (r > 0 && (p.revents & POLLHUP)) {
            /* No host. Readable bytes are kept: the driver delivers a new host's first bytes
             * before it reports that host's arrival (control messages are handled later,
             * in a work queue), so dropping them here loses its "SSH-" line; leftovers of a
             * gone connection are skipped by await_client. Sleep until a signal: SIGIO
             * once a host connects (it may already be pending). */
            struct pollfd s = {sigfd, POLLIN, 0};
            poll(&s, 1, -1);
            continue;
        }
        if (r > 0 && (p.revents & POLLIN)) {
            session(port, server);
            continue;
        }
        /* A host is connected but silent: wait for its bytes, its leaving, or a child. */
        wait_port(port, POLLIN);
    }
}

/* ---------------------------------------------------------------- vsbx-exec */

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static char *unhex(const char *s, size_t n) {
    if (n % 2) return NULL;
    char *out = malloc(n / 2 + 1);
    if (!out) return NULL;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(out);
            return NULL;
        }
        out[i] = (char)(hi * 16 + lo);
    }
    out[n / 2] = 0;
    return out;
}

static volatile sig_atomic_t timed_out;
static void on_alarm(int sig) {
    (void)sig;
    timed_out = 1;
}

/* The signals an SSH "signal" request may carry that vsbx-exec passes on to its command's
 * process group (dropbear delivers the request to vsbx-exec). KILL cannot be caught: then
 * vsbx-exec dies and its command with it (PDEATHSIG). ALRM is vsbx-exec's own timeout. */
static const int forwarded[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM};
#define NFORWARDED (sizeof forwarded / sizeof forwarded[0])
static volatile pid_t forward_pgrp;

static void on_forward(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    if (sig == SIGHUP && si->si_code > 0) {
        /* The kernel's hang-up of our terminal (dropbear is gone), not a request: end as
         * before, so the command dies with us (PDEATHSIG) rather than run on unattended. */
        signal(SIGHUP, SIG_DFL);
        raise(SIGHUP);
        return;
    }
    if (forward_pgrp > 0) kill(-forward_pgrp, sig);
}

/* Wait for `pid`; at the timeout kill it and the process group `pgrp` (argv's). Returns 0,
 * or -1 when `pid` is not our child. */
static int wait_for(pid_t pid, pid_t pgrp, int *status) {
    for (;;) {
        pid_t r = waitpid(pid, status, 0);
        if (r == pid) return 0;
        if (r < 0 && errno == EINTR && timed_out) {
            kill(-pgrp, SIGKILL);
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
        } else if (r < 0 && errno != EINTR) {
            return -1;
        }
    }
}

static int read_pid(const char *path) {
    char buf[32] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    char *end;
    long v = strtol(buf, &end, 10);
    if (end == buf || v <= 1 || v > 0x7fffffff) return -1;
    return (int)v;
}

/* Publish the pid argv wrote to PIDFILE in PIDFILE.ready (atomically: temp + rename), so the
 * host can read it; the pid, or -1 (reported on stderr) when there is none or it cannot be
 * published (the process is then killed). */
static int publish_ready(const char *pidfile) {
    int pid = read_pid(pidfile);
    if (pid < 0) {
        fprintf(stderr, "vsbx-exec: no valid pid in %s\n", pidfile);
        return -1;
    }
    size_t n = strlen(pidfile);
    char *ready = malloc(n + 16), *tmp = malloc(n + 16);
    if (!ready || !tmp) return -1;
    snprintf(ready, n + 16, "%s.ready", pidfile);
    snprintf(tmp, n + 16, "%s.ready.tmp", pidfile);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", pid) < 0 || fclose(f) != 0 || rename(tmp, ready) < 0) {
        fprintf(stderr, "vsbx-exec: cannot write %s: %s\n", ready, strerror(errno));
        kill(pid, SIGKILL);
        return -1;
    }
    free(ready);
    free(tmp);
    return pid;
}

static int exit_code(int status) {
    if (timed_out) return 124;
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

/* `crun create` (argv) exited 0 and left the container init behind, reparented to us (we
 * are a child subreaper): publish its pid in PIDFILE.ready, then wait for it and exit with
 * its status. The container's stdio is ours: the SSH channel. */
static int supervise(const char *pidfile, pid_t pgrp) {
    int pid = publish_ready(pidfile);
    if (pid < 0) return 126;
    int status = 0;
    if (wait_for(pid, pgrp, &status) < 0) {
        /* Not our child: it ended before its parent did, and was reaped there. */
        fprintf(stderr, "vsbx-exec: the supervised process %d is not our child\n", pid);
        return 255;
    }
    return exit_code(status);
}

/* ---------------------------------------------------------------- the user (token u)
 *
 * `u NAME|UID[:GROUP|GID]` is resolved as runc (libcontainer/user GetExecUser) resolves an
 * OCI image's User, from /etc/passwd and /etc/group of the root the command runs in, parsed
 * here (the binary is static: no NSS). A name must have an entry; a numeric id needs none
 * and always means that id (its entry, if any, still gives the gid and home). Without an
 * explicit group the gid is the passwd entry's (0 without an entry) and the supplementary
 * groups are the /etc/group entries that list the user's name; with one, the gid is that
 * group's and there are no supplementary groups. HOME is the entry's home ("/" without an
 * entry or with an empty home) unless the request set HOME. */

#define MAX_GROUPS 256

struct ids {
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    int ngroups;
    char *home;
};

/* A decimal id as runc accepts it (0 to 2^31-1); -1 for anything else. */
static long parse_id(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 10 || strspn(s, "0123456789") != n) return -1;
    long long v = strtoll(s, NULL, 10);
    return v <= 0x7fffffff ? (long)v : -1;
}

/* Split a line of /etc/passwd or /etc/group at ':' into at most `max` fields; the count. */
static int fields(char *line, char **f, int max) {
    line[strcspn(line, "\n")] = 0;
    int n = 0;
    f[n++] = line;
    for (char *c = line; *c && n < max; c++) {
        if (*c == ':') {
            *c = 0;
            f[n++] = c + 1;
        }
    }
    return n;
}

static int is_member(char *list, const char *name) {
    for (char *m = strtok(list, ","); m; m = strtok(NULL, ","))
        if (strcmp(m, name) == 0) return 1;
    return 0;
}

/* Resolve `spec` (the value of token u) into `ids`; -1, with the reason on stderr, when a
 * name has no entry. Reads the files of the current root (call it after the chroot). */
static int resolve_user(char *spec, struct ids *ids) {
    char *group = strchr(spec, ':');
    if (group) *group++ = 0;
    long uid = parse_id(spec), gid = group ? parse_id(group) : -1;
    char *name = NULL, *line = NULL, *f[7];
    size_t cap = 0;
    ids->uid = uid < 0 ? 0 : (uid_t)uid;
    ids->gid = 0;
    ids->ngroups = 0;
    ids->home = "/";
    FILE *file = fopen("/etc/passwd", "re");
    while (file && getline(&line, &cap, file) > 0) {
        int n = fields(line, f, 7);
        if (n < 4) continue;
        long id = parse_id(f[2]), pgid = parse_id(f[3]);
        if (id < 0 || pgid < 0 || (uid >= 0 ? id != uid : strcmp(f[0], spec) != 0)) continue;
        name = strdup(f[0]); /* first match wins, as in runc */
        ids->uid = (uid_t)id;
        ids->gid = (gid_t)pgid;
        if (n >= 6 && *f[5]) ids->home = strdup(f[5]);
        break;
    }
    if (file) fclose(file);
    if (!name && uid < 0) {
        fprintf(stderr, "vsbx-exec: no user %s in /etc/passwd\n", spec);
        return -1;
    }
    if (group || name) {
        int found = 0;
        file = fopen("/etc/group", "re");
        while (file && getline(&line, &cap, file) > 0) {
            int n = fields(line, f, 4);
            if (n < 3) continue;
            long id = parse_id(f[2]);
            if (id < 0) continue;
            if (group) {
                if (gid >= 0 ? id != gid : strcmp(f[0], group) != 0) continue;
                ids->gid = (gid_t)id;
                found = 1;
                break;
            }
            if (n == 4 && is_member(f[3], name) && ids->ngroups < MAX_GROUPS) ids->groups[ids->ngroups++] = (gid_t)id;
        }
        if (file) fclose(file);
        if (group && !found) {
            if (gid < 0) {
                fprintf(stderr, "vsbx-exec: no group %s in /etc/group\n", group);
                return -1;
            }
            ids->gid = (gid_t)gid;
        }
    }
    free(line);
    return 0;
}

/* Become `ids` (groups, then gid, then uid); -1, reported, on failure. A credential change
 * clears the parent-death signal (prctl(2)), so it is set again. */
static int become(const struct ids *ids, pid_t parent) {
    if (setgroups((size_t)ids->ngroups, ids->groups) < 0 || setgid(ids->gid) < 0 || setuid(ids->uid) < 0) {
        fprintf(stderr, "vsbx-exec: cannot become uid %u gid %u: %s\n", (unsigned)ids->uid, (unsigned)ids->gid,
                strerror(errno));
        return -1;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) return -1; /* vsbx-exec died meanwhile */
    return 0;
}

/* ---------------------------------------------------------------- console socket (y) */

/* The unix socket crun's --console-socket connects to; -1 (errno set) on failure. */
static int console_listen(const char *path) {
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    unlink(path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(s, 4) < 0) {
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
    return s;
}

/* The pty master crun sent (SCM_RIGHTS) on a connection to `lsock`. argv exited already, so
 * its connection is queued: waiting a moment is only for a slow kernel. -1 when none came. */
static int console_receive(int lsock) {
    struct pollfd p = {lsock, POLLIN, 0};
    if (poll(&p, 1, 1000) <= 0) return -1;
    int c = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) return -1;
    char data[256], ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {data, sizeof data};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    ssize_t n = recvmsg(c, &m, MSG_CMSG_CLOEXEC);
    close(c);
    if (n < 0) return -1;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
            int fd;
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
            return fd;
        }
    }
    return -1;
}

/* argv failed after crun made the terminal: what the process wrote there (crun's child
 * reports a failed execve on its stderr, the terminal) is copied to our stdout, to be seen. */
static void console_flush(int lsock) {
    struct pollfd p = {lsock, POLLIN, 0};
    int master = poll(&p, 1, 0) > 0 ? console_receive(lsock) : -1;
    if (master < 0) return;
    char buf[4096];
    ssize_t n;
    fcntl(master, F_SETFL, O_NONBLOCK);
    while ((n = read(master, buf, sizeof buf)) > 0) {
        if (write(STDOUT_FILENO, buf, (size_t)n) < 0) break;
    }
    close(master);
}

/* Our own terminal's size (the host's, set by SSH window-changes) onto the container's. */
static void copy_winsize(int master) {
    struct winsize ws;
    if (ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0) ioctl(master, TIOCSWINSZ, &ws);
}

/* Like supervise(), for a terminal process: crun sent its pty master on the console socket
 * `lsock`. Our stdin goes to the master, the master's output to our stdout (one stream: a
 * terminal has no stderr), until the process ended and its terminal is drained. Our own pty
 * (if the host asked for one) is made raw, so every byte (^C, ^D) reaches the container's
 * terminal, whose line discipline handles it; SIGWINCH on ours resizes the container's. */
static int supervise_tty(const char *pidfile, pid_t pgrp, const char *console, int lsock) {
    int master = console_receive(lsock);
    close(lsock);
    unlink(console);
    if (master < 0) {
        fprintf(stderr, "vsbx-exec: no terminal came on the console socket\n");
        int pid = read_pid(pidfile);
        if (pid > 0) kill(pid, SIGKILL);
        kill(-pgrp, SIGKILL);
        return 126;
    }
    copy_winsize(master); /* before the pid is published: the host starts the init after it */
    int pid = publish_ready(pidfile);
    if (pid < 0) return 126;
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGWINCH);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (isatty(STDIN_FILENO)) {
        struct termios t;
        if (tcgetattr(STDIN_FILENO, &t) == 0) {
            cfmakeraw(&t);
            tcsetattr(STDIN_FILENO, TCSANOW, &t);
        }
    }
    copy_winsize(master); /* a window-change that came before our mask */
    fcntl(master, F_SETFL, O_NONBLOCK);
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    fcntl(STDOUT_FILENO, F_SETFL, fcntl(STDOUT_FILENO, F_GETFL) | O_NONBLOCK);
    static struct pipebuf in, out; /* in: our stdin -> master, out: master -> our stdout */
    int status = 0, exited = 0, in_eof = 0, master_eof = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r < 0) {
        fprintf(stderr, "vsbx-exec: the supervised process %d is not our child\n", pid);
        return 255;
    }
    exited = r == pid;
    /* After the exit, what the terminal still holds is drained until it stays quiet a moment
     * (a child of the process may keep the terminal open: it is not waited for). */
    while (!(exited && master_eof && out.len == 0)) {
        short mev = (short)((!master_eof && out.len < BUF ? POLLIN : 0) | (!master_eof && in.len ? POLLOUT : 0));
        struct pollfd p[4] = {
            {!in_eof && in.len < BUF ? STDIN_FILENO : -1, POLLIN, 0},
            {mev ? master : -1, mev, 0},
            {out.len ? STDOUT_FILENO : -1, POLLOUT, 0},
            {sfd, POLLIN, 0},
        };
        int n = poll(p, 4, exited ? 200 : -1);
        if (n < 0) {
            if (errno != EINTR) break;
            if (timed_out && !exited) kill(pid, SIGKILL);
            continue;
        }
        if (n == 0) break; /* exited, and the terminal stayed quiet */
        if (p[3].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
                if (si.ssi_signo == SIGWINCH) copy_winsize(master);
            }
            int st;
            while ((r = waitpid(-1, &st, WNOHANG)) > 0) {
                if (r == pid) {
                    status = st;
                    exited = 1;
                }
            }
        }
        if ((p[0].revents & (POLLIN | POLLHUP | POLLERR)) && !fill(STDIN_FILENO, &in)) in_eof = 1;
        if ((p[1].revents & (POLLIN | POLLHUP | POLLERR)) && !fill(master, &out)) master_eof = 1;
        if ((p[1].revents & POLLOUT) && in.len && !drain(master, &in)) in.len = 0;
        if (master_eof) in.len = 0;
        if ((p[2].revents & (POLLOUT | POLLERR | POLLHUP)) && out.len && !drain(STDOUT_FILENO, &out)) {
            out.len = 0; /* nobody reads our stdout any more: the host is gone */
            if (exited) break;
        }
    }
    close(master);
    return exit_code(status);
}

/* ---------------------------------------------------------------- the keeper (tokens p + k)
 *
 * A container init must outlive the SSH session that created it (a restart of the host's
 * `vmsandbox serve` drops the connection). With `k PREFIX` the supervision runs in a keeper:
 * a child that leaves the session (setsid), becomes the child subreaper and runs argv with
 * stdout/stderr appended to PREFIX.out / PREFIX.err (files on the share the host reads), then
 * supervises the daemon as `p` does and writes the exit code to PREFIX.exit (temp + rename).
 * For its whole life it holds an flock on a guest-local lock file, so `w PREFIX` can wait for
 * it from any later session: the lock is released even when the keeper is SIGKILLed (no exit
 * file then: 255). The session's vsbx-exec just waits for the keeper and exits with its code.
 */

static char *suffixed(const char *prefix, const char *suffix) {
    size_t n = strlen(prefix) + strlen(suffix) + 1;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s%s", prefix, suffix);
    return s;
}

/* /run/vsbx/keep/<PREFIX with '/' as '_'>.lock (VSBX_KEEP_DIR for tests on the host). */
static char *lock_path(const char *prefix) {
    const char *dir = getenv("VSBX_KEEP_DIR");
    if (!dir || !*dir) dir = "/run/vsbx/keep";
    mkdir("/run/vsbx", 0755);
    mkdir(dir, 0700);
    size_t d = strlen(dir), n = d + strlen(prefix) + 8;
    char *s = malloc(n);
    if (!s) return NULL;
    snprintf(s, n, "%s/%s.lock", dir, prefix);
    for (char *c = s + d + 1; *c; c++)
        if (*c == '/') *c = '_';
    return s;
}

static int write_exit(const char *prefix, int code) {
    char *tmp = suffixed(prefix, ".exit.tmp"), *dst = suffixed(prefix, ".exit");
    if (!tmp || !dst) return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    int ok = dprintf(fd, "%d\n", code) > 0;
    if (close(fd) != 0 || !ok) return -1;
    return rename(tmp, dst);
}

/* The keeper's exit code from PREFIX.exit; 255 when there is none (it was killed). */
static int read_exit(const char *prefix) {
    char *path = suffixed(prefix, ".exit");
    char buf[16] = {0};
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return 255;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    char *end;
    long v = n > 0 ? strtol(buf, &end, 10) : -1;
    return (n > 0 && end != buf && v >= 0 && v <= 255) ? (int)v : 255;
}

/* `w PREFIX`: wait for the keeper of PREFIX to end, then exit with its code. */
static int rejoin(const char *prefix) {
    char *lock = lock_path(prefix);
    int fd = lock ? open(lock, O_RDWR | O_CLOEXEC) : -1;
    if (fd >= 0) {
        while (flock(fd, LOCK_EX) < 0 && errno == EINTR) {
        }
        close(fd);
    }
    return read_exit(prefix);
}

static int open_append(const char *prefix, const char *suffix) {
    char *path = suffixed(prefix, suffix);
    return path ? open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600) : -1;
}

static int run_supervised(char **args, char **envs, const char *cwd, int chrooted, const char *pidfile,
                          long timeout_ms, char *user);

/* In the keeper: take the lock, run argv with its output on the files, supervise, record. */
static int keep(const char *prefix, char **args, char **envs, const char *cwd, int chrooted, const char *pidfile) {
    char *lock = lock_path(prefix), *exitf = suffixed(prefix, ".exit");
    int lk = lock ? open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;
    if (lk < 0 || flock(lk, LOCK_EX | LOCK_NB) < 0) {
        fprintf(stderr, "vsbx-exec: %s is kept already or cannot be locked\n", prefix);
        return 126;
    }
    if (exitf) unlink(exitf);
    int out = open_append(prefix, ".out"), err = open_append(prefix, ".err");
    if (out < 0 || err < 0) {
        fprintf(stderr, "vsbx-exec: cannot open %s.out/.err: %s\n", prefix, strerror(errno));
        return 126;
    }
    pid_t k = fork();
    if (k < 0) {
        perror("vsbx-exec: fork");
        return 126;
    }
    if (k > 0) {
        close(lk); /* the keeper holds it (the same open file) */
        int status = 0;
        while (waitpid(k, &status, 0) < 0) {
            if (errno != EINTR) return 255;
        }
        return WIFEXITED(status) ? WEXITSTATUS(status) : 255;
    }
    /* The keeper: no tie to this session; its own messages go to the err file too. */
    setsid();
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    dup2(out, STDOUT_FILENO);
    dup2(err, STDERR_FILENO);
    int code = run_supervised(args, envs, cwd, chrooted, pidfile, 0, NULL);
    if (write_exit(prefix, code) < 0) fprintf(stderr, "vsbx-exec: cannot write %s.exit: %s\n", prefix, strerror(errno));
    unlink(lock);
    _exit(code);
}

/* Token y: the console socket's path and its listening socket (-1: none). */
static const char *console;
static int lsock = -1;

static int exec_main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "-c") != 0 || strncmp(argv[2], "vsbx1", 5) != 0) {
        fprintf(stderr, "vsbx-exec: only vmsandbox exec requests are accepted\n");
        return 126;
    }
    char *args[1024], *envs[1024], *cwd = NULL, *pidfile = NULL, *keep_prefix = NULL, *rejoin_prefix = NULL;
    char *user = NULL;
    int nargs = 0, nenvs = 0, in_root = 0;
    long timeout_ms = 0;
    char *p = argv[2] + 5;
    while (*p) {
        while (*p == ' ') p++;
        if (!*p) break;
        char kind = *p++;
        size_t n = strcspn(p, " ");
        char *val = unhex(p, n);
        p += n;
        if (!val) {
            fprintf(stderr, "vsbx-exec: malformed request\n");
            return 126;
        }
        switch (kind) {
        case 'a': if (nargs < 1023) args[nargs++] = val; break;
        case 'e': if (nenvs < 1023) envs[nenvs++] = val; break;
        case 'c': cwd = val; break;
        case 't': timeout_ms = strtol(val, NULL, 10); break;
        case 'r': in_root = 1; break;
        case 'p': pidfile = val; break;
        case 'k': keep_prefix = val; break;
        case 'w': rejoin_prefix = val; break;
        case 'y': console = val; break;
        case 'u': user = val; break;
        default: fprintf(stderr, "vsbx-exec: unknown token %c\n", kind); return 126;
        }
    }
    if (rejoin_prefix) return rejoin(rejoin_prefix);
    if (user && pidfile) {
        /* crun must run as root; a container's user is in its OCI spec. */
        fprintf(stderr, "vsbx-exec: u (user) is not for supervised commands (p)\n");
        return 126;
    }
    if (keep_prefix && !pidfile) {
        fprintf(stderr, "vsbx-exec: k needs p\n");
        return 126;
    }
    if (nargs == 0) {
        fprintf(stderr, "vsbx-exec: empty argv\n");
        return 126;
    }
    args[nargs] = NULL;
    envs[nenvs] = NULL;
    if (console && (!pidfile || keep_prefix)) {
        fprintf(stderr, "vsbx-exec: a console socket needs a supervised pid file and no keeper\n");
        return 126;
    }
    if (console && (lsock = console_listen(console)) < 0) {
        fprintf(stderr, "vsbx-exec: console socket %s: %s\n", console, strerror(errno));
        return 126;
    }
    struct stat st;
    int chrooted = !in_root && stat("/run/vsbx/rootfs-ready", &st) == 0;
    if (keep_prefix) return keep(keep_prefix, args, envs, cwd, chrooted, pidfile);
    return run_supervised(args, envs, cwd, chrooted, pidfile, timeout_ms, user);
}

/* Run argv (in /rootfs when chrooted; as `user` when set) and wait for it; with a pidfile,
 * then supervise the daemon it left behind. The exit code vsbx-exec reports. */
static int run_supervised(char **args, char **envs, const char *cwd, int chrooted, const char *pidfile,
                          long timeout_ms, char *user) {
    /* The daemon argv leaves behind is reparented to us rather than to PID 1. */
    if (pidfile && prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) {
        perror("vsbx-exec: PR_SET_CHILD_SUBREAPER");
        return 126;
    }
    /* A plain command gets the signals sent to us (supervision keeps its semantics: a signal
     * ends vsbx-exec, not the container). Blocked until the child's group exists, so none is
     * lost in between. */
    int forward = !pidfile;
    sigset_t fwd, old;
    sigemptyset(&fwd);
    for (size_t i = 0; i < NFORWARDED; i++) sigaddset(&fwd, forwarded[i]);
    if (forward) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_forward;
        sa.sa_flags = SA_SIGINFO;
        sigfillset(&sa.sa_mask);
        sigprocmask(SIG_BLOCK, &fwd, &old);
        for (size_t i = 0; i < NFORWARDED; i++) sigaction(forwarded[i], &sa, NULL);
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        perror("vsbx-exec: fork");
        return 126;
    }
    if (pid == 0) {
        setpgid(0, 0);
        /* Die with vsbx-exec: if the session is torn down (host gone, dropbear killed), the
         * command must not run on unsupervised, past its timeout. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(126); /* the parent already died */
        signal(SIGPIPE, SIG_DFL);
        if (forward) {
            /* Default dispositions (a shell cannot trap a signal ignored at its start), then
             * the mask the session gave us. */
            for (size_t i = 0; i < NFORWARDED; i++) signal(forwarded[i], SIG_DFL);
            sigprocmask(SIG_SETMASK, &old, NULL);
        }
        if (!console && isatty(STDIN_FILENO)) {
            /* On a pty (the host asked for a tty) our group must be the foreground one, or
             * the command stops at its first tty read (SIGTTIN) and never sees SIGWINCH. */
            signal(SIGTTOU, SIG_IGN);
            tcsetpgrp(STDIN_FILENO, getpid());
            signal(SIGTTOU, SIG_DFL);
        }
        if (chrooted && (chroot("/rootfs") < 0 || chdir("/") < 0)) {
            perror("vsbx-exec: chroot /rootfs");
            _exit(126);
        }
        struct ids ids;
        if (user && resolve_user(user, &ids) < 0) _exit(126);
        /* The cwd is entered as root, and again as the user only when root may not (as runc
         * does: a directory only the user can enter, on a file system that denies root). */
        const char *dir = cwd ? cwd : "/";
        int cd = chdir(dir);
        if (cd < 0 && !(user && (errno == EACCES || errno == EPERM))) {
            fprintf(stderr, "vsbx-exec: chdir %s: %s\n", dir, strerror(errno));
            _exit(126);
        }
        if (user && become(&ids, parent) < 0) _exit(126);
        if (cd < 0 && chdir(dir) < 0) {
            fprintf(stderr, "vsbx-exec: chdir %s: %s\n", dir, strerror(errno));
            _exit(126);
        }
        clearenv();
        for (char **e = envs; *e; e++) putenv(*e);
        if (user && !getenv("HOME")) setenv("HOME", ids.home, 1);
        execvp(args[0], args);
        int e = errno;
        fprintf(stderr, "vsbx-exec: %s: %s\n", args[0], strerror(e));
        _exit(e == ENOENT ? 127 : 126);
    }
    if (forward) {
        setpgid(pid, pid); /* the child's own call may not have run yet */
        forward_pgrp = pid;
        sigprocmask(SIG_SETMASK, &old, NULL);
    }
    if (timeout_ms > 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm;
        sigaction(SIGALRM, &sa, NULL);
        alarm((unsigned)((timeout_ms + 999) / 1000));
    }
    int status = 0;
    if (wait_for(pid, pid, &status) < 0) return 126;
    if (pidfile && !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return console ? supervise_tty(pidfile, pid, console, lsock) : supervise(pidfile, pid);
    if (console) {
        console_flush(lsock);
        unlink(console);
    }
    if (timed_out) {
        fprintf(stderr, "vsbx-exec: timed out after %ld ms\n", timeout_ms);
        return 124;
    }
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

int main(int argc, char **argv) {
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    if (strcmp(base, "vsbx-exec") == 0) return exec_main(argc, argv);
    return agent_main(argc, argv);
}
