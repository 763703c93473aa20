/*
 * podnet: an LD_PRELOAD shim that gives every process of an executed pod the network view of a pod.
 *
 * In a real pod, a server that binds the wildcard address (0.0.0.0 or ::) listens only on the pod's
 * own network namespace. Executed pods share the host's namespace, so a wildcard bind would listen on
 * every interface of this machine, and two pods binding the same port (two Ray heads on 6379, two
 * TCPStores on 2345) would collide. This shim rewrites a wildcard bind() to the pod IP taken from
 * LING_EXEC_POD_IP (a 127.x loopback address): the pod keeps its ports to itself and nothing it
 * starts listens beyond loopback. Test infrastructure only (see docs/e2e.md).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  const char *ip = getenv("LING_EXEC_POD_IP");
  struct in_addr pod;
  if (addr == NULL || ip == NULL || inet_pton(AF_INET, ip, &pod) != 1) return real_bind(fd, addr, len);
  if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr = pod;
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
      /* A dual-stack wildcard becomes the v4-mapped pod IP (IPv4 clients reach it as the pod IP). */
      int off = 0;
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
      memset(&a.sin6_addr, 0, sizeof a.sin6_addr);
      a.sin6_addr.s6_addr[10] = 0xff;
      a.sin6_addr.s6_addr[11] = 0xff;
      memcpy(&a.sin6_addr.s6_addr[12], &pod, 4);
      return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
  }
  return real_bind(fd, addr, len);
}
