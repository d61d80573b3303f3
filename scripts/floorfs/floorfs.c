/* floorfs: the least a FUSE file system can cost a tree walk on this machine.
 *
 * A benchmark peer of scripts/bench, not part of nixfs.  It serves, read-only, a copy
 * in memory of a directory tree taken at start: no layers, no database, no Python, one
 * thread, and the kernel settings nixfs asks for (READDIRPLUS always, opendir and open
 * answered ENOSYS so that the kernel keeps listings and opens itself, symlink targets
 * kept by the kernel, entries and attributes that never expire, the device polled
 * before sleeping).  What a walk through it costs is the FUSE protocol's own share: the
 * round trips and the wake-ups of the machine; what nixfs costs beyond is its own.
 *
 *   floorfs [--poll-us N] SOURCE MOUNTPOINT     (foreground; umount MOUNTPOINT to stop)
 *
 * Nodes are never freed (the tree does not change), so FORGET is only acknowledged.
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <fuse_lowlevel.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <poll.h>
#include <time.h>

struct node {
	char *name;
	struct stat st;
	char *target;          /* symlink target */
	char *path;            /* path below SOURCE, for reads */
	fuse_ino_t *children;
	size_t nchildren;
};

static struct node *nodes;     /* nodes[ino - 1]; ino 1 is the root */
static size_t nnodes, cap;
static int source_fd;
static const double forever = 1e9;

static fuse_ino_t add_node(const char *name, const char *path, const struct stat *st)
{
	if (nnodes == cap) {
		cap = cap ? 2 * cap : 1024;
		nodes = realloc(nodes, cap * sizeof *nodes);
		if (!nodes) { perror("realloc"); exit(1); }
	}
	struct node *n = &nodes[nnodes++];
	memset(n, 0, sizeof *n);
	n->name = strdup(name);
	n->path = strdup(path);
	n->st = *st;
	n->st.st_ino = nnodes;
	return nnodes;
}

static void scan(fuse_ino_t ino)
{
	const char *path = nodes[ino - 1].path;
	int fd = openat(source_fd, *path ? path : ".", O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
	if (fd < 0) { perror(path); exit(1); }
	DIR *d = fdopendir(fd);
	struct dirent *e;
	fuse_ino_t *kids = NULL;
	size_t nkids = 0;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		struct stat st;
		if (fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) { perror(e->d_name); exit(1); }
		char *child;
		if (asprintf(&child, "%s%s%s", path, *path ? "/" : "", e->d_name) < 0) exit(1);
		fuse_ino_t c = add_node(e->d_name, child, &st);
		free(child);
		if (S_ISLNK(st.st_mode)) {
			char buf[4096];
			ssize_t len = readlinkat(fd, e->d_name, buf, sizeof buf - 1);
			if (len < 0) { perror(e->d_name); exit(1); }
			buf[len] = 0;
			nodes[c - 1].target = strdup(buf);
		}
		kids = realloc(kids, (nkids + 1) * sizeof *kids);
		if (!kids) { perror("realloc"); exit(1); }
		kids[nkids++] = c;
	}
	closedir(d);
	nodes[ino - 1].children = kids;
	nodes[ino - 1].nchildren = nkids;
	for (size_t i = 0; i < nkids; i++)
		if (S_ISDIR(nodes[kids[i] - 1].st.st_mode))
			scan(kids[i]);
}

static struct node *get(fuse_ino_t ino)
{
	return ino >= 1 && ino <= nnodes ? &nodes[ino - 1] : NULL;
}

static void entry_of(fuse_ino_t ino, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof *e);
	e->ino = ino;
	e->attr = nodes[ino - 1].st;
	e->attr_timeout = e->entry_timeout = forever;
}

static void fl_init(void *data, struct fuse_conn_info *conn)
{
	(void)data;
	if (conn->capable & FUSE_CAP_READDIRPLUS)
		conn->want |= FUSE_CAP_READDIRPLUS;
	conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void fl_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct node *p = get(parent);
	if (!p) { fuse_reply_err(req, ENOENT); return; }
	for (size_t i = 0; i < p->nchildren; i++)
		if (!strcmp(nodes[p->children[i] - 1].name, name)) {
			struct fuse_entry_param e;
			entry_of(p->children[i], &e);
			fuse_reply_entry(req, &e);
			return;
		}
	struct fuse_entry_param neg = { .ino = 0, .entry_timeout = forever };
	fuse_reply_entry(req, &neg);
}

static void fl_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)fi;
	struct node *n = get(ino);
	if (!n) { fuse_reply_err(req, ENOENT); return; }
	fuse_reply_attr(req, &n->st, forever);
}

static void fl_readlink(fuse_req_t req, fuse_ino_t ino)
{
	struct node *n = get(ino);
	if (!n || !n->target) { fuse_reply_err(req, EINVAL); return; }
	fuse_reply_readlink(req, n->target);
}

static void fl_enosys(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, ENOSYS);
}

/* Offsets: 0 start, k (k >= 1) after the k-th child. */
static void fl_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			   struct fuse_file_info *fi)
{
	(void)fi;
	struct node *d = get(ino);
	if (!d) { fuse_reply_err(req, ENOENT); return; }
	char *buf = malloc(size), *p = buf;
	size_t left = size;
	if (!buf) { fuse_reply_err(req, ENOMEM); return; }
	for (size_t i = off; i < d->nchildren; i++) {
		struct fuse_entry_param e;
		entry_of(d->children[i], &e);
		size_t len = fuse_add_direntry_plus(req, p, left, nodes[d->children[i] - 1].name,
						    &e, i + 1);
		if (len > left)
			break;
		p += len;
		left -= len;
	}
	fuse_reply_buf(req, buf, size - left);
	free(buf);
}

static void fl_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)fi;
	struct node *n = get(ino);
	if (!n) { fuse_reply_err(req, ENOENT); return; }
	int fd = openat(source_fd, n->path, O_RDONLY | O_NOFOLLOW);
	if (fd < 0) { fuse_reply_err(req, errno); return; }
	char *buf = malloc(size);
	if (!buf) { close(fd); fuse_reply_err(req, ENOMEM); return; }
	ssize_t got = pread(fd, buf, size, off);
	close(fd);
	if (got < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_buf(req, buf, got);
	free(buf);
}

static void fl_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	(void)ino; (void)nlookup;
	fuse_reply_none(req);
}

static void fl_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *f)
{
	(void)count; (void)f;
	fuse_reply_none(req);
}

static const struct fuse_lowlevel_ops ops = {
	.init = fl_init,
	.lookup = fl_lookup,
	.getattr = fl_getattr,
	.readlink = fl_readlink,
	.opendir = fl_enosys,
	.open = fl_enosys,
	.readdirplus = fl_readdirplus,
	.read = fl_read,
	.forget = fl_forget,
	.forget_multi = fl_forget_multi,
};

static long now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000L + t.tv_nsec / 1000;
}

/* One thread: after each request, poll the device for up to poll_us before sleeping
 * (as nixfs does with -o poll_us), so that a walker's next request finds it awake. */
static void serve(struct fuse_session *se, long poll_us)
{
	struct fuse_buf buf = { .mem = NULL };
	int fd = fuse_session_fd(se);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	long idle_since = now_us();
	while (!fuse_session_exited(se)) {
		int res = fuse_session_receive_buf(se, &buf);
		if (res == -EAGAIN || res == -EINTR) {
			if (now_us() - idle_since >= poll_us) {
				struct pollfd pfd = { .fd = fd, .events = POLLIN };
				poll(&pfd, 1, -1);
				idle_since = now_us();
			}
			continue;
		}
		if (res <= 0)
			break;  /* 0 or -ENODEV: unmounted */
		fuse_session_process_buf(se, &buf);
		idle_since = now_us();
	}
	free(buf.mem);
}

int main(int argc, char *argv[])
{
	char *prog = argv[0];
	long poll_us = 0;
	if (argc == 5 && !strcmp(argv[1], "--poll-us")) {
		char *end;
		poll_us = strtol(argv[2], &end, 10);
		if (*end || poll_us < 0) {
			fprintf(stderr, "%s: --poll-us takes microseconds, not %s\n", prog, argv[2]);
			return 2;
		}
		argv += 2;
		argc -= 2;
	}
	if (argc != 3) {
		fprintf(stderr, "usage: %s [--poll-us N] SOURCE MOUNTPOINT\n", prog);
		return 2;
	}
	source_fd = open(argv[1], O_RDONLY | O_DIRECTORY);
	if (source_fd < 0) { perror(argv[1]); return 1; }
	struct stat st;
	if (fstat(source_fd, &st) < 0) { perror(argv[1]); return 1; }
	add_node("", "", &st);
	scan(1);
	char *fargv[] = { prog, "-o", "ro,default_permissions,allow_other,fsname=floorfs", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
	if (!se || fuse_session_mount(se, argv[2]) != 0) return 1;
	fprintf(stderr, "floorfs: %zu nodes from %s on %s\n", nnodes, argv[1], argv[2]);
	serve(se, poll_us);
	fuse_session_unmount(se);
	fuse_session_destroy(se);
	return 0;
}
