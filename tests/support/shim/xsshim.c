/*
 * xsshim.c - LD_PRELOAD stand-in for the hypervisor-facing Xen libraries,
 * so that the real C xenstored (Debian's Xen 4.17 build) can run on a test
 * machine that has no Xen hypervisor.
 *
 * Why this exists
 * ---------------
 * Our integration tests want to talk to the genuine xenstored, not to a
 * re-implementation.  xenstored itself is an ordinary Unix daemon serving a
 * Unix socket, but at start-up it insists on opening libxenctrl (privcmd),
 * libxenevtchn (/dev/xen/evtchn) and libxengnttab (/dev/xen/gntdev), and on
 * reading /proc/xen/xsd_port and mapping /proc/xen/xsd_kva to set up dom0's
 * shared ring.  Without a hypervisor all of these fail and the daemon exits.
 * Its "-D" (no domain init) escape hatch crashes on the first write in 4.17.
 *
 * This library is preloaded into xenstored only.  It replaces exactly the
 * handful of libxenctrl / libxenevtchn / libxengnttab entry points the daemon
 * imports, and redirects the two /proc/xen files into a scratch directory.
 * It does not touch anything else: the store, the socket protocol,
 * permissions, transactions, quotas and watches are all the real daemon's.
 *
 * Configuration (environment of the xenstored process)
 * ----------------------------------------------------
 *   XENDDEV_SHIM_DIR   scratch directory (required).  The shim uses:
 *     xsd_port   text file with dom0's xenstore event-channel port; created
 *                holding "1" when missing.  Stands in for /proc/xen/xsd_port.
 *     xsd_kva    4096-byte file used as dom0's ring page; created (zeroed)
 *                when missing.  Stands in for /proc/xen/xsd_kva.
 *     domains    optional text file: the domain ids that "exist", separated
 *                by white space or commas; re-read on every query.  When the
 *                file is missing only domain 0 exists.
 *     evtchn     FIFO created by the shim.  Its read end is the event-channel
 *                fd xenstored polls; nothing is ever written to it by the
 *                shim, so it stays quiet unless a test writes a 4-byte
 *                native-endian local port number into it (for instance
 *                XSSHIM_VIRQ_PORT_BASE + 3 to raise VIRQ_DOM_EXC, which makes
 *                xenstored re-check which domains exist).
 *     ring-<domid>  4096-byte file mapped as the ring page of an introduced
 *                domain (instead of a grant mapping).
 *     port-<domid>  text file with the local port bound to that domain.
 *   XENDDEV_SHIM_DOMAINS  default domain list used when the "domains" file
 *                is missing (same syntax), default "0".
 *   XENDDEV_SHIM_PARENT_PID  optional: pid of the process that started the
 *                daemon; xenstored gets SIGKILL when that process dies
 *                (PR_SET_PDEATHSIG), so test crashes leave no daemons behind.
 *
 * The event-channel fd is deliberately not close-on-exec: xenstored's live
 * update re-executes itself and hands the fd over via xenevtchn_fdopen().
 *
 * Symbol versions matter: xenstored references e.g. xc_domain_getinfo@
 * VERS_4.17.0 and xenevtchn_fdopen@VERS_1.2, so xsshim.map gives every
 * definition the version the daemon asks for.  open() is wrapped at
 * GLIBC_2.2.5 and forwards to libc's open via dlvsym(RTLD_NEXT, ...).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define XSSHIM_PAGE_SIZE 4096
#define XSSHIM_VIRQ_PORT_BASE 4000u
#define XSSHIM_MAX_DOMAINS 1024

/* ------------------------------------------------------------------ */
/* Helpers                                                            */
/* ------------------------------------------------------------------ */

typedef int (*open_fn)(const char *, int, ...);

static open_fn real_open_fn(void)
{
    static open_fn fn;

    if (!fn) {
        fn = (open_fn)dlvsym(RTLD_NEXT, "open", "GLIBC_2.2.5");
        if (!fn)
            fn = (open_fn)dlsym(RTLD_NEXT, "open");
    }
    return fn;
}

static const char *shim_dir(void)
{
    const char *dir = getenv("XENDDEV_SHIM_DIR");

    return (dir && *dir) ? dir : NULL;
}

/* Build "<shim dir>/<name>" into buf; returns buf, or NULL if unusable. */
static char *shim_path(char *buf, size_t len, const char *name)
{
    const char *dir = shim_dir();
    int n;

    if (!dir)
        return NULL;
    n = snprintf(buf, len, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= len)
        return NULL;
    return buf;
}

/* Create a file of the given content/size if it does not exist yet. */
static void ensure_file(const char *path, const char *content, off_t size)
{
    int fd = real_open_fn()(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                            0600);

    if (fd < 0)
        return; /* exists already (or cannot be created: open reports it) */
    if (content) {
        size_t len = strlen(content);

        if (write(fd, content, len) != (ssize_t)len)
            perror("xsshim: writing default file");
    }
    if (size > 0 && ftruncate(fd, size) != 0)
        perror("xsshim: sizing default file");
    close(fd);
}

static void write_text_file(const char *name, unsigned int value)
{
    char path[PATH_MAX], text[32];
    int fd;

    if (!shim_path(path, sizeof(path), name))
        return;
    fd = real_open_fn()(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    snprintf(text, sizeof(text), "%u\n", value);
    if (write(fd, text, strlen(text)) < 0)
        perror("xsshim: writing port file");
    close(fd);
}

/* ------------------------------------------------------------------ */
/* open(): redirect /proc/xen/xsd_port and /proc/xen/xsd_kva          */
/* ------------------------------------------------------------------ */

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    char redirected[PATH_MAX];

    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;

        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }

    if (strcmp(path, "/proc/xen/xsd_port") == 0 &&
        shim_path(redirected, sizeof(redirected), "xsd_port")) {
        ensure_file(redirected, "1\n", 0);
        path = redirected;
    } else if (strcmp(path, "/proc/xen/xsd_kva") == 0 &&
               shim_path(redirected, sizeof(redirected), "xsd_kva")) {
        ensure_file(redirected, NULL, XSSHIM_PAGE_SIZE);
        path = redirected;
    }

    return real_open_fn()(path, flags, mode);
}

/* ------------------------------------------------------------------ */
/* libxenctrl                                                         */
/* ------------------------------------------------------------------ */

/*
 * Leading part of the 4.17 xc_dominfo_t (the whole struct is 112 bytes on
 * x86-64; xc_domain_getinfo fills arrays with that stride).  Only the
 * fields xenstored looks at are named; the rest is zeroed.
 */
typedef struct {
    uint32_t domid;
    uint32_t ssidref;
    unsigned int dying:1, crashed:1, shutdown:1, paused:1, blocked:1,
                 running:1, hvm:1, debugged:1, xenstore:1, hap:1;
    unsigned int shutdown_reason;
    unsigned char rest[112 - 16];
} xsshim_dominfo;

struct xsshim_xc {
    int magic;
};

void *xc_interface_open(void *logger, void *dombuild_logger,
                        unsigned int open_flags)
{
    struct xsshim_xc *xc = calloc(1, sizeof(*xc));

    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    if (xc)
        xc->magic = 0x78737863;
    return xc;
}

int xc_interface_close(void *xch)
{
    free(xch);
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return (x > y) - (x < y);
}

/* Parse a domain list ("0 1,5") into ids[]; returns the count, sorted. */
static size_t parse_domains(const char *text, uint32_t *ids, size_t max)
{
    size_t n = 0;
    const char *p = text;

    while (*p && n < max) {
        char *end;
        unsigned long v;

        while (*p && !(*p >= '0' && *p <= '9'))
            p++;
        if (!*p)
            break;
        v = strtoul(p, &end, 10);
        p = end;
        if (v <= 0x7FF0)
            ids[n++] = (uint32_t)v;
    }
    qsort(ids, n, sizeof(ids[0]), cmp_u32);
    return n;
}

static size_t existing_domains(uint32_t *ids, size_t max)
{
    char path[PATH_MAX], buf[8192];
    const char *env;
    int fd;

    if (shim_path(path, sizeof(path), "domains")) {
        fd = real_open_fn()(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t len = read(fd, buf, sizeof(buf) - 1);

            close(fd);
            buf[len > 0 ? len : 0] = '\0';
            return parse_domains(buf, ids, max);
        }
    }
    env = getenv("XENDDEV_SHIM_DOMAINS");
    return parse_domains(env ? env : "0", ids, max);
}

int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms,
                      void *info)
{
    static uint32_t ids[XSSHIM_MAX_DOMAINS];
    xsshim_dominfo *out = info;
    size_t n, i;
    unsigned int filled = 0;

    if (!xch || !info) {
        errno = EINVAL;
        return -1;
    }
    n = existing_domains(ids, XSSHIM_MAX_DOMAINS);
    for (i = 0; i < n && filled < max_doms; i++) {
        if (ids[i] < first_domid || (i > 0 && ids[i] == ids[i - 1]))
            continue;
        memset(&out[filled], 0, sizeof(out[filled]));
        out[filled].domid = ids[i];
        out[filled].running = 1;
        filled++;
    }
    return (int)filled;
}

/* ------------------------------------------------------------------ */
/* libxenevtchn                                                       */
/* ------------------------------------------------------------------ */

struct xsshim_evtchn {
    int rfd;            /* what xenstored polls */
    int wfd;            /* kept open so rfd never reports EOF (-1 if FIFO) */
    uint32_t next_port;
    uint32_t virq_port; /* last bound VIRQ port, 0 if none */
};

static struct xsshim_evtchn *evtchn_alloc(void)
{
    struct xsshim_evtchn *h = calloc(1, sizeof(*h));

    if (!h)
        return NULL;
    h->rfd = h->wfd = -1;
    h->next_port = 10; /* dom0's interdomain binding etc. start here */
    return h;
}

void *xenevtchn_open(void *logger, unsigned int open_flags)
{
    struct xsshim_evtchn *h = evtchn_alloc();
    char path[PATH_MAX];
    int fds[2];

    (void)logger;
    (void)open_flags;
    if (!h)
        return NULL;

    /*
     * Prefer a FIFO in the shim directory: opened read-write it never sees
     * EOF, and a test can inject events by writing port numbers into it.
     */
    if (shim_path(path, sizeof(path), "evtchn")) {
        if (mkfifo(path, 0600) == 0 || errno == EEXIST)
            h->rfd = real_open_fn()(path, O_RDWR | O_NONBLOCK);
    }
    if (h->rfd < 0) {
        if (pipe2(fds, O_NONBLOCK) != 0) {
            free(h);
            return NULL;
        }
        h->rfd = fds[0];
        h->wfd = fds[1];
    }
    return h;
}

void *xenevtchn_fdopen(void *logger, int fd, unsigned int open_flags)
{
    struct xsshim_evtchn *h = evtchn_alloc();

    (void)logger;
    (void)open_flags;
    if (!h)
        return NULL;
    h->rfd = fd;
    return h;
}

int xenevtchn_close(void *xce)
{
    struct xsshim_evtchn *h = xce;

    if (!h)
        return 0;
    if (h->rfd >= 0)
        close(h->rfd);
    if (h->wfd >= 0)
        close(h->wfd);
    free(h);
    return 0;
}

int xenevtchn_fd(void *xce)
{
    struct xsshim_evtchn *h = xce;

    return h ? h->rfd : -1;
}

int xenevtchn_bind_virq(void *xce, unsigned int virq)
{
    struct xsshim_evtchn *h = xce;

    if (!h) {
        errno = EINVAL;
        return -1;
    }
    h->virq_port = XSSHIM_VIRQ_PORT_BASE + virq;
    return (int)h->virq_port;
}

int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port)
{
    struct xsshim_evtchn *h = xce;
    char name[32];
    uint32_t port;

    (void)remote_port;
    if (!h) {
        errno = EINVAL;
        return -1;
    }
    port = h->next_port++;
    if (h->next_port >= XSSHIM_VIRQ_PORT_BASE)
        h->next_port = 10;
    snprintf(name, sizeof(name), "port-%u", domid);
    write_text_file(name, port);
    return (int)port;
}

int xenevtchn_bind_unbound_port(void *xce, uint32_t domid)
{
    return xenevtchn_bind_interdomain(xce, domid, 0);
}

int xenevtchn_notify(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_unbind(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

int xenevtchn_unmask(void *xce, uint32_t port)
{
    (void)xce;
    (void)port;
    return 0;
}

/*
 * Called by xenstored only when the fd polled readable, i.e. a test wrote a
 * port number into the FIFO.  Never fail here (xenstored treats a failure as
 * fatal): if no complete port number is available, report the VIRQ port,
 * which merely makes xenstored re-scan the domain list.
 */
int xenevtchn_pending(void *xce)
{
    struct xsshim_evtchn *h = xce;
    unsigned char buf[sizeof(uint32_t)];
    size_t got = 0;
    uint32_t port;

    if (!h) {
        errno = EINVAL;
        return -1;
    }
    while (got < sizeof(buf)) {
        ssize_t r = read(h->rfd, buf + got, sizeof(buf) - got);

        if (r > 0) {
            got += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (got > 0 && r < 0 && errno == EAGAIN) {
            /* Partial number: wait briefly for the rest. */
            struct pollfd pfd = { .fd = h->rfd, .events = POLLIN };

            if (poll(&pfd, 1, 100) <= 0)
                break;
        } else {
            break;
        }
    }
    if (got < sizeof(buf))
        return (int)(h->virq_port ? h->virq_port : XSSHIM_VIRQ_PORT_BASE + 3);
    memcpy(&port, buf, sizeof(port));
    return (int)port;
}

/* ------------------------------------------------------------------ */
/* libxengnttab                                                       */
/* ------------------------------------------------------------------ */

struct xsshim_gnttab {
    int magic;
};

void *xengnttab_open(void *logger, unsigned int open_flags)
{
    struct xsshim_gnttab *h = calloc(1, sizeof(*h));

    (void)logger;
    (void)open_flags;
    if (h)
        h->magic = 0x78736774;
    return h;
}

int xengnttab_close(void *xgt)
{
    free(xgt);
    return 0;
}

int xengnttab_set_max_grants(void *xgt, uint32_t nr_grants)
{
    (void)xgt;
    (void)nr_grants;
    return 0;
}

/*
 * Map "the" xenstore ring page of a domain.  With a shim directory this is
 * the file ring-<domid> (shared, so a test could play the guest), otherwise
 * an anonymous zeroed page.
 */
void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref,
                              int prot)
{
    char name[32], path[PATH_MAX];
    void *addr;
    int fd;

    (void)ref;
    if (!xgt) {
        errno = EINVAL;
        return NULL;
    }
    snprintf(name, sizeof(name), "ring-%u", domid);
    if (shim_path(path, sizeof(path), name)) {
        ensure_file(path, NULL, XSSHIM_PAGE_SIZE);
        fd = real_open_fn()(path, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            addr = mmap(NULL, XSSHIM_PAGE_SIZE, prot, MAP_SHARED, fd, 0);
            close(fd);
            if (addr != MAP_FAILED)
                return addr;
        }
    }
    addr = mmap(NULL, XSSHIM_PAGE_SIZE, prot, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
    return addr == MAP_FAILED ? NULL : addr;
}

int xengnttab_unmap(void *xgt, void *start_address, uint32_t count)
{
    (void)xgt;
    if (!start_address || count == 0)
        return 0;
    return munmap(start_address, (size_t)count * XSSHIM_PAGE_SIZE);
}

/* ------------------------------------------------------------------ */

__attribute__((constructor)) static void xsshim_init(void)
{
    const char *parent = getenv("XENDDEV_SHIM_PARENT_PID");

    if (!shim_dir())
        fprintf(stderr, "xsshim: XENDDEV_SHIM_DIR is not set; "
                        "/proc/xen files will not be redirected\n");

    /*
     * Optionally tie the daemon's life to the test process that spawned it,
     * so a crashed or killed test run does not leave xenstored behind.
     */
    if (parent && *parent) {
        long want = strtol(parent, NULL, 10);

        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
            perror("xsshim: prctl(PR_SET_PDEATHSIG)");
        if (want > 0 && (long)getppid() != want)
            raise(SIGKILL); /* the parent is already gone */
    }
}
