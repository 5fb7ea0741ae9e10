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
 *     listener fails with EADDRINUSE.
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
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
