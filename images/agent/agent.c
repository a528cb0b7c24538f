/*
 * vmsandbox guest agent: one static binary, two personalities chosen by argv[0].
 *
 * vsbx-agent PORT HOSTKEY   (PID 1 after /init): reaps every orphan, and bridges the
 *     virtio-serial PORT to a fresh `dropbear -i` per host connection. A virtio-serial port
 *     reports POLLHUP while no host end is connected, so poll() cannot wait for a host: the
 *     agent waits for the port's SIGIO instead and never wakes up periodically. A session
 *     starts once the host connected; when dropbear ends, everything it wrote still goes to
 *     the host; when the host goes away, everything of the session is dropped, so no stale
 *     bytes reach the next SSH handshake (see shared/reference/host-notes.md).
 *
 * vsbx-exec -c "vsbx1 TOKENS"   (root's login shell, run by dropbear for each exec): decodes
 *     hex tokens (a=argv element, e=KEY=VALUE, c=cwd, t=timeout ms, r=run in the guest root
 *     rather than the sandbox rootfs), chroots into /rootfs when it is mounted and execs argv
 *     directly, never through a shell. Exit code: the child's, or 128+signal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

/* SIGCHLD (an orphan or dropbear ended) and SIGIO (the port's host end connected or
 * disconnected, or data arrived) stay blocked and are read from this fd, so the agent sleeps
 * in poll() with no timeout and wakes only for them. -1 if signalfd failed: then it polls
 * with timeouts instead (reaping still works, idle costs wake-ups). */
static int sigfd = -1;
static sigset_t inherited_mask; /* restored for dropbear */

static void reap(void) {
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void drain_signals(void) {
    struct signalfd_siginfo si;
    while (sigfd >= 0 && read(sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
    }
    reap();
}

/* Sleep until a signal arrives. */
static void wait_signal(void) {
    if (sigfd < 0) {
        sleep_ms(100);
        reap();
        return;
    }
    struct pollfd s = {sigfd, POLLIN, 0};
    poll(&s, 1, -1);
    drain_signals();
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

static void discard_input(int fd) {
    char junk[4096];
    while (read(fd, junk, sizeof junk) > 0) {
    }
}

/* The port reports POLLHUP, whatever was asked, while no host end is connected. */
static int host_connected(int port) {
    struct pollfd p = {port, 0, 0};
    return poll(&p, 1, 0) >= 0 && !(p.revents & (POLLHUP | POLLERR));
}

/* SIGIO on every change of the port (host connects or leaves, data arrives): wanted only
 * while waiting for a host, where poll() cannot wait (POLLHUP is reported at once).
 * Returns 1 when the change was made. */
static int port_sigio(int port, int on) {
    int fl = fcntl(port, F_GETFL);
    return sigfd >= 0 && fl >= 0 && fcntl(port, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC) == 0;
}

/* Block until a host connects. What the port holds when the wait starts with no host is
 * left over from the connection that ended, and would corrupt the next handshake: drop it.
 * What arrives later is kept: it is the next host's first bytes, which can be read before
 * the kernel has processed that host's port-open message (a workqueue runs it, data comes
 * from the interrupt), and dropping them would break its handshake. */
static void wait_for_host(int port) {
    int armed = port_sigio(port, 1);
    if (!host_connected(port)) discard_input(port);
    while (!host_connected(port)) { /* checked after SIGIO is armed: no change is missed */
        if (armed) {
            wait_signal();
        } else {
            sleep_ms(100);
            reap();
        }
    }
    if (armed) port_sigio(port, 0);
}

/* The session ended with the host still connected: wait (blocking) for it to leave,
 * dropping what it still sends. */
static void wait_for_hangup(int port) {
    for (;;) {
        struct pollfd p[2] = {{port, POLLIN, 0}, {sigfd, POLLIN, 0}};
        if (poll(p, 2, sigfd < 0 ? 1000 : -1) < 0 && errno != EINTR) return;
        if (p[1].revents) drain_signals();
        if (p[0].revents & POLLIN) discard_input(port);
        if (p[0].revents & (POLLHUP | POLLERR)) {
            discard_input(port);
            return;
        }
    }
}

static pid_t spawn_dropbear(int sock, const char *hostkey) {
    pid_t pid = fork();
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, &inherited_mask, NULL); /* exec keeps a blocked mask */
        setsid();
        dup2(sock, 0);
        dup2(sock, 1);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        for (int fd = 3; fd < 64; fd++) close(fd);
        execl("/usr/sbin/dropbear", "dropbear", "-i", "-s", "-r", hostkey, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* One host connection: run a dropbear session until the host goes away, or until dropbear
 * ended and every byte it wrote reached the port. */
static void session(int port, const char *hostkey) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        sleep_ms(100);
        return;
    }
    pid_t pid = spawn_dropbear(sv[1], hostkey);
    close(sv[1]);
    if (pid < 0) { /* never kill(-1) below: that would be every process */
        close(sv[0]);
        sleep_ms(100);
        return;
    }
    fcntl(sv[0], F_SETFL, O_NONBLOCK);
    static struct pipebuf up, down; /* up: dropbear -> host, down: host -> dropbear */
    up.len = down.len = 0;
    int host_gone = 0;
    int bear_eof = 0;  /* read all dropbear wrote: its end is closed */
    int bear_deaf = 0; /* dropbear reads no more: what the host sends is dropped */
    while (!(bear_eof && up.len == 0)) {
        short pe = (short)((!bear_deaf && down.len < BUF ? POLLIN : 0) | (up.len ? POLLOUT : 0));
        short be = (short)((!bear_eof && up.len < BUF ? POLLIN : 0) | (!bear_deaf && down.len ? POLLOUT : 0));
        /* A closed socket reports POLLHUP whatever was asked: poll it only when there is
         * something to do with it, or the loop would spin while `up` is full. */
        struct pollfd p[3] = {{port, pe, 0}, {be ? sv[0] : -1, be, 0}, {sigfd, POLLIN, 0}};
        if (poll(p, 3, sigfd < 0 ? 1000 : -1) < 0) {
            if (errno != EINTR) break;
            continue;
        }
        if (p[2].revents) drain_signals();
        if (p[0].revents & (POLLHUP | POLLERR)) { /* host disconnected: nobody reads the rest */
            host_gone = 1;
            break;
        }
        if ((p[0].revents & POLLIN) && !fill(port, &down)) {
            host_gone = 1;
            break;
        }
        /* Dropbear's end closed (POLLHUP) may still hold what it wrote last: read to EOF. */
        if ((p[1].revents & (POLLIN | POLLHUP | POLLERR)) && (be & POLLIN) && !fill(sv[0], &up)) bear_eof = 1;
        if ((p[0].revents & POLLOUT) && up.len && !drain(port, &up)) {
            host_gone = 1;
            break;
        }
        if ((p[1].revents & POLLOUT) && down.len && !drain(sv[0], &down)) bear_deaf = 1;
        if (p[1].revents & (POLLHUP | POLLERR)) bear_deaf = 1;
        if (bear_deaf) down.len = 0;
    }
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    close(sv[0]);
    reap();
    if (!host_gone) wait_for_hangup(port);
}

static int agent_main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vsbx-agent PORT HOSTKEY\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGIO);
    sigprocmask(SIG_BLOCK, &set, &inherited_mask);
    sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) {
        perror("vsbx-agent: signalfd (polling instead)");
        sigprocmask(SIG_SETMASK, &inherited_mask, NULL);
    }
    int port = open(argv[1], O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (port < 0) {
        perror("vsbx-agent: open port");
        /* Stay PID 1 so the kernel does not panic; just reap. */
        for (;;) wait_signal();
    }
    fcntl(port, F_SETOWN, getpid());
    for (;;) {
        wait_for_host(port);
        session(port, argv[2]);
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

static int exec_main(int argc, char **argv) {
    if (argc != 3 || strcmp(argv[1], "-c") != 0 || strncmp(argv[2], "vsbx1", 5) != 0) {
        fprintf(stderr, "vsbx-exec: only vmsandbox exec requests are accepted\n");
        return 126;
    }
    char *args[1024], *envs[1024], *cwd = NULL;
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
        default: fprintf(stderr, "vsbx-exec: unknown token %c\n", kind); return 126;
        }
    }
    if (nargs == 0) {
        fprintf(stderr, "vsbx-exec: empty argv\n");
        return 126;
    }
    args[nargs] = NULL;
    envs[nenvs] = NULL;
    struct stat st;
    int chrooted = !in_root && stat("/run/vsbx/rootfs-ready", &st) == 0;

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
        if (getppid() == 1) _exit(126); /* the parent already died */
        signal(SIGPIPE, SIG_DFL);
        if (chrooted && (chroot("/rootfs") < 0 || chdir("/") < 0)) {
            perror("vsbx-exec: chroot /rootfs");
            _exit(126);
        }
        if (chdir(cwd ? cwd : "/") < 0) {
            fprintf(stderr, "vsbx-exec: chdir %s: %s\n", cwd ? cwd : "/", strerror(errno));
            _exit(126);
        }
        clearenv();
        for (int i = 0; i < nenvs; i++) putenv(envs[i]);
        execvp(args[0], args);
        int e = errno;
        fprintf(stderr, "vsbx-exec: %s: %s\n", args[0], strerror(e));
        _exit(e == ENOENT ? 127 : 126);
    }
    if (timeout_ms > 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm;
        sigaction(SIGALRM, &sa, NULL);
        alarm((unsigned)((timeout_ms + 999) / 1000));
    }
    int status = 0;
    for (;;) {
        pid_t r = waitpid(pid, &status, 0);
        if (r == pid) break;
        if (r < 0 && errno == EINTR && timed_out) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
        } else if (r < 0 && errno != EINTR) {
            return 126;
        }
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
