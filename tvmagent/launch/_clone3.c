/* Start a task process in one step: clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD |
 * CLONE_INTO_CGROUP) on a small stack of its own, then, in the child, before the task's first
 * instruction: join the v1 cgroups (write "0" to their `tasks` files: moves only this thread, no
 * RCU wait), new session, stdio, rlimits, groups and ids (raw syscalls: glibc's set*id would
 * signal the agent's threads, whose memory the child shares), working directory, exec. A task
 * that drops to a task user first enters the agent's task mount namespace (`task_mntns`), whose
 * /proc shows each user only its own processes.
 *
 * Why not subprocess: Python forks instead of vforking as soon as a user or group is given, and
 * a pid written into a v2 cgroup.procs costs ~8 ms of wall time when writes are spread out;
 * clone3 puts the child into its v2 cgroup at birth. Built only where a compiler exists (see
 * setup.py); tvmagent/launch/spawn.py falls back to an exec-time wrapper chain elsewhere.
 *
 * The child shares the agent's memory until exec, so it only makes system calls and writes
 * into the request it was given; all signals stay blocked until its handlers are reset.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(SYS_clone3) && defined(CLONE_INTO_CGROUP)
#define HAVE_CLONE3_TRAMPOLINE 1
#else
#define HAVE_CLONE3_TRAMPOLINE 0
#endif

#define CHILD_STACK (64 * 1024)
#define MAX_JOIN 8
#define MAX_RLIMITS 4

/* Steps, reported with errno when the child fails before exec. */
enum { STEP_NONE, STEP_JOIN, STEP_SETSID, STEP_STDIO, STEP_RLIMIT, STEP_GROUPS,
       STEP_GID, STEP_UID, STEP_CHDIR, STEP_EXEC, STEP_NNP, STEP_MNTNS };
static const char *const step_names[] = {
    "", "join cgroup", "setsid", "redirect stdio", "set rlimit", "set groups",
    "set gid", "set uid", "chdir", "exec", "set no_new_privs", "enter mount namespace"};

struct request {
    const char *path;
    char **argv;
    char **envp;
    const char *cwd;
    int fds[3];
    int join_fds[MAX_JOIN];
    int n_join;
    int mntns_fd;
    int set_ids;
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    size_t n_groups;
    int rlim_res[MAX_RLIMITS];
    struct rlimit rlim[MAX_RLIMITS];
    int n_rlim;
    volatile int err;
    volatile int step;
};

static int fail(struct request *r, int step)
{
    r->err = errno;
    r->step = step;
    syscall(SYS_exit, 127);
    return 127;
}

static int child_main(void *arg)
{
    struct request *r = arg;
    struct sigaction dfl;
    sigset_t none;
    int sig, i;

    /* Handlers of the agent must never run here (shared memory); ignored signals must not
     * stay ignored in the task. Caught ones are reset by exec anyway. */
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            (void)sigaction(sig, &dfl, NULL); /* glibc's reserved signals refuse: fine */
    }
    /* Before anything that resolves a path: the working directory is looked up in it. */
    if (r->mntns_fd >= 0 && syscall(SYS_setns, r->mntns_fd, CLONE_NEWNS) < 0)
        return fail(r, STEP_MNTNS);
    for (i = 0; i < r->n_join; i++) {
        if (write(r->join_fds[i], "0", 1) != 1)
            return fail(r, STEP_JOIN);
    }
    if (setsid() < 0)
        return fail(r, STEP_SETSID);
    for (i = 0; i < 3; i++) {
        if (dup2(r->fds[i], i) < 0)
            return fail(r, STEP_STDIO);
    }
#ifdef SYS_close_range
    /* Anything inheritable the agent holds stays out of the task (ENOSYS: kernels < 5.11). */
    (void)syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */);
#endif
    for (i = 0; i < r->n_rlim; i++) {
        if (setrlimit(r->rlim_res[i], &r->rlim[i]) < 0)
            return fail(r, STEP_RLIMIT);
    }
    if (r->set_ids) {
        if (syscall(SYS_setgroups, r->n_groups, r->groups) < 0)
            return fail(r, STEP_GROUPS);
        if (syscall(SYS_setresgid, r->gid, r->gid, r->gid) < 0)
            return fail(r, STEP_GID);
        if (syscall(SYS_setresuid, r->uid, r->uid, r->uid) < 0)
            return fail(r, STEP_UID);
        /* No exec of the task gains privileges: a setuid file left where the task's pool can run
         * it (shared/) would otherwise turn a task into its owner, a slot user that may be
         * running another tenant's task by then. */
        if (syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) < 0)
            return fail(r, STEP_NNP);
    }
    /* After the drop: the task's user must be able to enter its own directory. */
    if (chdir(r->cwd) < 0)
        return fail(r, STEP_CHDIR);
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
    execve(r->path, r->argv, r->envp);
    return fail(r, STEP_EXEC);
}

#if HAVE_CLONE3_TRAMPOLINE
/* clone3 with a new stack returns into the child with only that stack: call fn(arg) from asm,
 * as glibc's clone() does for the older syscall. */
static long clone3_run(struct clone_args *ca, int (*fn)(void *), void *arg)
{
    long ret;
    register long r12 __asm__("r12") = (long)fn;
    register long r13 __asm__("r13") = (long)arg;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov $60, %%eax\n\t"
        "syscall\n\t"
        "1:\n\t"
        : "=a"(ret)
        : "0"((long)SYS_clone3), "D"(ca), "S"(sizeof *ca), "r"(r12), "r"(r13)
        : "rcx", "r11", "memory");
    return ret;
}
#endif

/* ------------------------------------------------------------------ Python glue */

static int bytes_array(PyObject *seq, const char *what, char ***out, PyObject **keep)
{
    PyObject *t = PySequence_Tuple(seq);
    Py_ssize_t n, i;
    if (t == NULL)
        return -1;
    n = PyTuple_GET_SIZE(t);
    *out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (*out == NULL) {
        Py_DECREF(t);
        PyErr_NoMemory();
        return -1;
    }
    /* str items are encoded here (the file system encoding, as os.fsencode does) and kept in
     * a new tuple; bytes are taken as they are. */
    {
        PyObject *enc = PyTuple_New(n);
        if (enc == NULL) {
            PyMem_Free(*out);
            *out = NULL;
            Py_DECREF(t);
            return -1;
        }
        for (i = 0; i < n; i++) {
            PyObject *item = PyTuple_GET_ITEM(t, i), *b = NULL;
            if (PyUnicode_Check(item))
                b = PyUnicode_EncodeFSDefault(item);
            else if (PyBytes_Check(item))
                b = Py_NewRef(item);
            if (b == NULL || (Py_ssize_t)strlen(PyBytes_AS_STRING(b)) != PyBytes_GET_SIZE(b)) {
                if (b != NULL || !PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "%s items must be str or bytes without NUL",
                                 what);
                Py_XDECREF(b);
                PyMem_Free(*out);
                *out = NULL;
                Py_DECREF(enc);
                Py_DECREF(t);
                return -1;
            }
            PyTuple_SET_ITEM(enc, i, b);
            (*out)[i] = PyBytes_AS_STRING(b);
        }
        Py_DECREF(t);
        *keep = enc;
    }
    return 0;
}

static PyObject *py_spawn(PyObject *self, PyObject *args)
{
    const char *path, *cwd;
    PyObject *argv_o, *envp_o, *join_o, *ids_o, *rlim_o;
    PyObject *keep_argv = NULL, *keep_envp = NULL, *result = NULL;
    int fd_in, fd_out, fd_err, cgroup_fd, mntns_fd = -1;
    struct request r;
    Py_ssize_t i;
    (void)self;

    if (!PyArg_ParseTuple(args, "yOOy(iii)iOOO|i:spawn", &path, &argv_o, &envp_o, &cwd, &fd_in,
                          &fd_out, &fd_err, &cgroup_fd, &join_o, &ids_o, &rlim_o, &mntns_fd))
        return NULL;
#if !HAVE_CLONE3_TRAMPOLINE
    (void)cgroup_fd;
    PyErr_SetString(PyExc_OSError, "clone3 launcher not built for this architecture");
    return NULL;
#else
    memset(&r, 0, sizeof r);
    r.mntns_fd = mntns_fd;
    r.path = path;
    r.cwd = cwd;
    r.fds[0] = fd_in;
    r.fds[1] = fd_out;
    r.fds[2] = fd_err;
    for (i = 0; i < 3; i++) {
        if (r.fds[i] < 3) {
            PyErr_SetString(PyExc_ValueError, "stdio fds must be >= 3");
            return NULL;
        }
    }
    if (!PyTuple_Check(join_o) || PyTuple_GET_SIZE(join_o) > MAX_JOIN) {
        PyErr_SetString(PyExc_ValueError, "join_fds must be a tuple of at most 8 fds");
        return NULL;
    }
    r.n_join = (int)PyTuple_GET_SIZE(join_o);
    for (i = 0; i < r.n_join; i++) {
        r.join_fds[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(join_o, i));
        if (r.join_fds[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!PyTuple_Check(rlim_o) || PyTuple_GET_SIZE(rlim_o) > MAX_RLIMITS) {
        PyErr_SetString(PyExc_ValueError, "rlimits must be a tuple of at most 4 triples");
        return NULL;
    }
    r.n_rlim = (int)PyTuple_GET_SIZE(rlim_o);
    for (i = 0; i < r.n_rlim; i++) {
        unsigned long long soft, hard;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(rlim_o, i), "iKK", &r.rlim_res[i], &soft, &hard))
            return NULL;
        r.rlim[i].rlim_cur = (rlim_t)soft;
        r.rlim[i].rlim_max = (rlim_t)hard;
    }
    if (ids_o != Py_None) {
        PyObject *groups_o;
        unsigned int uid, gid;
        if (!PyArg_ParseTuple(ids_o, "IIO!", &uid, &gid, &PyTuple_Type, &groups_o))
            return NULL;
        r.set_ids = 1;
        r.uid = uid;
        r.gid = gid;
        r.n_groups = (size_t)PyTuple_GET_SIZE(groups_o);
        r.groups = PyMem_Calloc(r.n_groups + 1, sizeof(gid_t));
        if (r.groups == NULL)
            return PyErr_NoMemory();
        for (i = 0; i < (Py_ssize_t)r.n_groups; i++) {
            unsigned long g = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(groups_o, i));
            if (PyErr_Occurred())
                goto done;
            r.groups[i] = (gid_t)g;
        }
    }
    if (bytes_array(argv_o, "argv", &r.argv, &keep_argv) < 0)
        goto done;
    if (r.argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto done;
    }
    if (bytes_array(envp_o, "env", &r.envp, &keep_envp) < 0)
        goto done;
    {
        struct clone_args ca;
        sigset_t all, old;
        void *stack;
        int pidfd = -1, saved_errno = 0;
        long pid;

        Py_BEGIN_ALLOW_THREADS
        stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            pid = -1;
            saved_errno = errno;
        } else {
            memset(&ca, 0, sizeof ca);
            ca.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD;
            if (cgroup_fd >= 0) {
                ca.flags |= CLONE_INTO_CGROUP;
                ca.cgroup = (uint64_t)cgroup_fd;
            }
            ca.pidfd = (uint64_t)(uintptr_t)&pidfd;
            ca.exit_signal = SIGCHLD;
            ca.stack = (uint64_t)(uintptr_t)stack;
            ca.stack_size = CHILD_STACK;
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            /* The raw syscall returns -errno; the child may have written the errno of this
             * thread (it runs with our thread pointer), so errno itself is not read here. */
            pid = clone3_run(&ca, child_main, &r);
            if (pid < 0)
                saved_errno = (int)-pid;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            munmap(stack, CHILD_STACK);
        }
        Py_END_ALLOW_THREADS

        if (pid < 0) {
            errno = saved_errno;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        if (r.step != STEP_NONE) {
            int status;
            while (waitpid((pid_t)pid, &status, 0) < 0 && errno == EINTR)
                ;
            if (pidfd >= 0)
                close(pidfd);
            result = Py_BuildValue("(iis)", r.err, r.step, step_names[r.step]);
            if (result != NULL) {
                PyErr_SetObject(PyExc_ChildProcessError, result);
                Py_CLEAR(result);
            }
            goto done;
        }
        result = Py_BuildValue("(li)", pid, pidfd);
    }
done:
    PyMem_Free(r.groups);
    PyMem_Free(r.argv);
    PyMem_Free(r.envp);
    Py_XDECREF(keep_argv);
    Py_XDECREF(keep_envp);
    return result;
#endif
}

/* Empty a user's own kernel keyrings (its user, user-session and persistent keyrings), which
 * outlive its processes: what one task of a slot user stored there, the next task of that uid
 * would read. Root cannot reach another uid's user keyrings (key permissions have no override),
 * so a forked child takes the uid and clears them. The child makes raw system calls only, then
 * _exits. */
static PyObject *py_clear_keyrings(PyObject *self, PyObject *args)
{
    unsigned int uid, gid;
    int status = 0, err = 0;
    pid_t pid;
    (void)self;
    if (!PyArg_ParseTuple(args, "II", &uid, &gid))
        return NULL;
    if (uid == 0) {
        PyErr_SetString(PyExc_ValueError, "refusing to clear root's keyrings");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pid = fork();
    if (pid == 0) {
        /* First, as root, the persistent keyring (kept for days; a kernel without them says
         * EOPNOTSUPP): got for the uid into the child's own process keyring, which makes the
         * child its possessor (the right to empty it), and which is root's, so the uid's key
         * counts do not move with it. Made for the uid if it had none. */
        long persistent = syscall(SYS_keyctl, 22 /* KEYCTL_GET_PERSISTENT */, uid, -2);
        if (persistent > 0 && syscall(SYS_keyctl, 7 /* KEYCTL_CLEAR */, persistent) != 0)
            _exit(3);
        if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setresgid, gid, gid, gid) != 0 ||
            syscall(SYS_setresuid, uid, uid, uid) != 0)
            _exit(2);
        if (syscall(SYS_keyctl, 7, -4 /* KEY_SPEC_USER_KEYRING */) != 0 ||
            syscall(SYS_keyctl, 7, -5 /* KEY_SPEC_USER_SESSION_KEYRING */) != 0)
            _exit(3);
        _exit(0);
    }
    if (pid < 0)
        err = errno;
    else
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    Py_END_ALLOW_THREADS
    if (pid < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        PyErr_Format(PyExc_OSError, "clearing the keyrings of uid %u failed (%s %d)", uid,
                     WIFEXITED(status) ? "exit" : "signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
        return NULL;
    }
    Py_RETURN_NONE;
}

/* A mount namespace for tasks: a copy of the host's mounts that receives later host mounts where
 * the host shares them (never sends any back), with its own /proc mounted hidepid=invisible, so a
 * task user lists and reads only its own processes (the command lines of other tenants' tasks
 * often carry secrets). Returns a descriptor of it: it lives while that descriptor is open, and
 * clone3 children enter it with setns (a few microseconds, against ~150 for a namespace of their
 * own). A child sharing the agent's memory and descriptor table (no fork: no copy of the page
 * tables, which took ~3 ms in an agent-sized process) makes it and opens its descriptor into the
 * shared table, then exits; the agent waits meanwhile (vfork). */
struct mntns_req {
    int fd;
    int err;
    int step;
};

static int mntns_child(void *arg)
{
    struct mntns_req *q = arg;
    if (syscall(SYS_unshare, CLONE_NEWNS) < 0)
        q->step = 1;
    else if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
        q->step = 2;
    else if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "hidepid=invisible") < 0)
        q->step = 3;
    else if ((q->fd = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC)) < 0)
        q->step = 4;
    if (q->step)
        q->err = errno; /* this thread's errno, while the agent's thread waits */
    return q->step ? 1 : 0;
}

static PyObject *py_task_mntns(PyObject *self, PyObject *args)
{
    static const char *const what[] = {"make it", "unshare the mount namespace",
                                       "make the mounts receive-only", "mount /proc",
                                       "open its descriptor"};
    struct mntns_req q = {-1, 0, 0};
    sigset_t all, old;
    void *stack;
    pid_t pid;
    int status = 0, err = 0;
    (void)self;
    (void)args;
    Py_BEGIN_ALLOW_THREADS
    stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
                 -1, 0);
    if (stack == MAP_FAILED) {
        pid = -1;
        err = errno;
    } else {
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* no handler of ours runs in the child */
        pid = clone(mntns_child, (char *)stack + CHILD_STACK,
                    CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD, &q);
        if (pid < 0)
            err = errno;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (pid > 0)
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        munmap(stack, CHILD_STACK);
    }
    Py_END_ALLOW_THREADS
    if (pid < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (q.step || q.fd < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        if (q.fd >= 0)
            close(q.fd);
        return PyErr_Format(PyExc_OSError, "cannot %s: %s", what[q.step],
                            q.step ? strerror(q.err) : "its maker did not finish");
    }
    return PyLong_FromLong(q.fd);
}

static PyMethodDef methods[] = {
    {"spawn", py_spawn, METH_VARARGS,
     "spawn(path, argv, envp, cwd, (stdin, stdout, stderr), cgroup_fd, join_fds, ids, rlimits"
     "[, mntns_fd]) -> (pid, pidfd). ids: None or (uid, gid, groups); mntns_fd: a mount "
     "namespace entered first (-1: none). A failure in the child before exec raises "
     "ChildProcessError((errno, step, step name))."},
    {"task_mntns", py_task_mntns, METH_NOARGS,
     "task_mntns() -> fd of a new mount namespace whose /proc is mounted hidepid=invisible."},
    {"clear_keyrings", py_clear_keyrings, METH_VARARGS,
     "clear_keyrings(uid, gid): empty that user's user and user-session keyrings (OSError if not)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_clone3", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__clone3(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "AVAILABLE", HAVE_CLONE3_TRAMPOLINE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
