/*
 * fedcompose's loopback shim, loaded into TFF's executor service (worker_binary)
 * with LD_PRELOAD.
 *
 * worker_binary hard-codes its listening address as "[::]:PORT" (every interface,
 * no TLS, no authentication) and sets SO_REUSEPORT, so a second process can serve
 * the same port. This shim:
 *   - rewrites a bind() to the wildcard address into a bind() to loopback
 *     (127.0.0.1; on a dual-stack IPv6 socket its v4-mapped form, so that the
 *     socket serves 127.0.0.1 exactly as a plain IPv4 one would; ::1 on an
 *     IPv6-only socket);
 *   - refuses a bind() to any other non-loopback address;
 *   - ignores SO_REUSEPORT, so the port is owned exclusively and a second
 *     listener fails with EADDRINUSE;
 *   - accepts a connection only from a socket owned by this process's own user:
 *     loopback is shared by every user of the machine, and the executor runs
 *     whatever graph it is sent as this user. The peer's owner is read from the
 *     kernel's socket table (/proc/net/tcp, tcp6: the socket whose local end is
 *     the peer's address and whose remote end is ours); a connection whose
 *     owner cannot be found is refused too (fail closed). A refused connection
 *     is closed before gRPC sees it, and one line goes to stderr (the
 *     executor's log), bounded.
 * It acts only inside a process whose executable is named worker_binary, so it
 * can be preloaded into a whole process tree (TFF's own local executors
 * included) without touching anything else, e.g. a worker's TLS proxy.
 * Built from this source on install (deploy/bootstrap.sh, shared/loopback.py);
 * never shipped as a binary. fedcompose checks after start that the process
 * listens on loopback only, so a shim that did not load is an error, not an
 * exposure.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* What this shim does, checked by shared/loopback.py before it is used: an
 * older shim without the per-user filter must not be taken for this one. */
__attribute__((used)) const char fedcompose_shim_features[] =
    "fedcompose-shim-features: loopback-bind exclusive-port uid-filter-v1";

static int confined = -1; /* 1: this process is worker_binary */

static int is_confined(void) {
  if (confined < 0) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    confined = 0;
    if (n > 0) {
      exe[n] = '\0';
      const char *base = strrchr(exe, '/');
      base = base ? base + 1 : exe;
      confined = strcmp(base, "worker_binary") == 0;
    }
  }
  return confined;
}

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind;
  if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (!is_confined()) return real_bind(fd, addr, len);
  if (addr != NULL && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if ((ntohl(a.sin_addr.s_addr) >> 24) != 127) {
      errno = EACCES;
      return -1;
    }
    return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
  }
  if (addr != NULL && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    static const unsigned char mapped_loopback[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                                      0, 0, 0xff, 0xff, 127, 0, 0, 1};
    if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
      int v6only = 1;
      socklen_t optlen = sizeof v6only;
      if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) == 0 && !v6only) {
        memcpy(&a.sin6_addr, mapped_loopback, sizeof mapped_loopback);
      } else {
        a.sin6_addr = in6addr_loopback;
      }
    } else if (!IN6_IS_ADDR_LOOPBACK(&a.sin6_addr) &&
               !(IN6_IS_ADDR_V4MAPPED(&a.sin6_addr) && a.sin6_addr.s6_addr[12] == 127)) {
      errno = EACCES;
      return -1;
    }
    return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
  }
  return real_bind(fd, addr, len);
}

int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
  static setsockopt_fn real_setsockopt;
  if (!real_setsockopt) real_setsockopt = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
  if (level == SOL_SOCKET && name == SO_REUSEPORT && is_confined()) return 0; /* exclusive */
  return real_setsockopt(fd, level, name, value, len);
}

/* A socket address as 16 bytes of IPv6 (IPv4 as v4-mapped) and a port. */
static int normalize(const struct sockaddr_storage *ss, unsigned char out[16], unsigned *port) {
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    memset(out, 0, 10);
    out[10] = out[11] = 0xff;
    memcpy(out + 12, &a->sin_addr, 4);
    *port = ntohs(a->sin_port);
    return 1;
  }
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
    memcpy(out, &a->sin6_addr, 16);
    *port = ntohs(a->sin6_port);
    return 1;
  }
  return 0;
}

/* /proc/net/tcp* print each 32-bit word of an address as a native integer. */
static int parse_hex_address(const char *hex, unsigned char out[16]) {
  size_t n = strlen(hex);
  if (n != 8 && n != 32) return 0;
  unsigned char raw[16];
  for (size_t w = 0; w < n / 8; w++) {
    char word[9];
    memcpy(word, hex + 8 * w, 8);
    word[8] = '\0';
    unsigned int v;
    if (sscanf(word, "%x", &v) != 1) return 0;
    memcpy(raw + 4 * w, &v, 4);
  }
  if (n == 8) {
    memset(out, 0, 10);
    out[10] = out[11] = 0xff;
    memcpy(out + 12, raw, 4);
  } else {
    memcpy(out, raw, 16);
  }
  return 1;
}

/* The owner of the socket whose local end is (addr, port) and remote end is
 * (raddr, rport); -1 if there is none. */
static long socket_owner(const unsigned char addr[16], unsigned port, const unsigned char raddr[16],
                         unsigned rport) {
  static const char *tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
  for (int t = 0; t < 2; t++) {
    FILE *f = fopen(tables[t], "re");
    if (!f) continue;
    char line[512];
    if (!fgets(line, sizeof line, f)) { /* header */
      fclose(f);
      continue;
    }
    while (fgets(line, sizeof line, f)) {
      char lhex[40], rhex[40];
      unsigned lport, rp, state, uid;
      if (sscanf(line, " %*d: %39[0-9A-Fa-f]:%x %39[0-9A-Fa-f]:%x %x %*x:%*x %*x:%*x %*x %u",
                 lhex, &lport, rhex, &rp, &state, &uid) != 6)
        continue;
      if (lport != port || rp != rport) continue;
      unsigned char l[16], r[16];
      if (!parse_hex_address(lhex, l) || !parse_hex_address(rhex, r)) continue;
      if (memcmp(l, addr, 16) == 0 && memcmp(r, raddr, 16) == 0) {
        fclose(f);
        return (long)uid;
      }
    }
    fclose(f);
  }
  return -1;
}

static unsigned long refused_count;

/* Whether connection `fd` comes from a socket of this process's user. */
static int peer_allowed(int fd) {
  struct sockaddr_storage local, peer;
  socklen_t llen = sizeof local, plen = sizeof peer;
  if (getsockname(fd, (struct sockaddr *)&local, &llen) != 0) return 0;
  if (getpeername(fd, (struct sockaddr *)&peer, &plen) != 0) return 0;
  if (local.ss_family != AF_INET && local.ss_family != AF_INET6) return 1; /* not TCP/IP */
  unsigned char l[16], p[16];
  unsigned lport, pport;
  if (!normalize(&local, l, &lport) || !normalize(&peer, p, &pport)) return 0;
  long owner = socket_owner(p, pport, l, lport);
  if (owner == (long)getuid()) return 1;
  refused_count++;
  /* Bounded: the first 20 refusals, then every 1000th. */
  if (refused_count <= 20 || refused_count % 1000 == 0) {
    if (owner < 0)
      dprintf(2, "fedcompose: refused a connection from port %u: its owner is not known "
                 "(only user %u may connect; %lu refused so far)\n",
              pport, (unsigned)getuid(), refused_count);
    else
      dprintf(2, "fedcompose: refused a connection from port %u of user %ld: only user %u "
                 "may connect (%lu refused so far)\n",
              pport, owner, (unsigned)getuid(), refused_count);
  }
  return 0;
}

typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static accept4_fn real_accept4;
  if (!real_accept4) real_accept4 = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
  for (;;) {
    int c = real_accept4(fd, addr, len, flags);
    if (c < 0 || !is_confined() || peer_allowed(c)) return c;
    close(c); /* and take the next one: a non-blocking socket says EAGAIN if none waits */
  }
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  static accept_fn real_accept;
  if (!real_accept) real_accept = (accept_fn)dlsym(RTLD_NEXT, "accept");
  for (;;) {
    int c = real_accept(fd, addr, len);
    if (c < 0 || !is_confined() || peer_allowed(c)) return c;
    close(c);
  }
}
