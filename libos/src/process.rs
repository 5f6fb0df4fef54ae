//! Tasks as processes: every task's own memory — its heap and its copy of the app's statics.
//!
//! ```text
//!  per task (lower half, L4 entry 255: "process memory", copied at every spawn)
//!  0x7f80_0000_0000  heap   PHEAP, 256 GiB of demand-zero address space; page 0 holds the
//!                           allocator's own state (mm::pheap), so it is copied with the heap
//!  0x7fff_c000_0000  statics, as the engine sees them (PSTATICS_SHADOW, the range's last GiB)
//!
//!  per task, upper half
//!  0xffff_ffff_c000_0000  statics, where the image links them (PSTATICS): this task's own L3
//!                         for L4 entry 511 ("top table") maps the image at entry 510 as every
//!                         task does and, at entry 511, the very L2 table the engine keeps for
//!                         the shadow — so both addresses reach the same pages
//!
//!  shared by every task (kernel half): libos's image and its own statics (`.data`/`.bss` of
//!  libos and the crates it is built from), the kernel heap, kernel stacks, the direct map
//! ```
//!
//! The engine manages the lower half only, so the statics live there for it (copy-on-write,
//! snapshot, demand paging) and the top table mirrors the one entry that leads to them. A
//! fault at `PSTATICS` is resolved at the shadow address, and the mirror is brought up to date
//! whenever the engine may have replaced the L2 table (an unshare): `sync_top`.
//!
//! Spawn is a fork: the child's process memory is a copy-on-write copy of the parent's as of the
//! spawn (`fork_template`, an engine snapshot of the range), so a closure's captured heap values
//! and everything the parent built are live in the child at the same addresses, and what either
//! writes afterwards the other never sees.

use crate::space::Template;
use templates::Error;

/// Statistics of the running task's own heap (what its app code allocated; `reserved_bytes` is
/// how far the heap's end has moved, pages are mapped as they are touched).
///
/// ```no_run
/// let v = alloc::vec![0u8; 1000];
/// let s = libos::process::heap_stats();
/// assert!(s.allocated_bytes >= 1000);
/// # drop(v);
/// ```
pub fn heap_stats() -> crate::HeapStats {
    crate::mm::pheap::stats()
}

/// Snapshots of process memory taken so far (spawns and seals), and how many of them found the
/// memory unchanged since the one before (no table walked: the cheap case).
///
/// ```no_run
/// let (all, clean) = libos::process::fork_counts();
/// libos::println!("{clean} of {all} spawns found the parent unchanged");
/// ```
pub fn fork_counts() -> (u64, u64) {
    (
        crate::procmem::FORKS.load(core::sync::atomic::Ordering::Relaxed),
        crate::procmem::CLEAN_FORKS.load(core::sync::atomic::Ordering::Relaxed),
    )
}

/// Warm state for a fork server: built once by ordinary Rust code in this task's heap, used in
/// place by every task spawned from it.
///
/// A child spawned with [`Zygote::spawn`] is a fork of this task (see [`crate::task::spawn`]):
/// its closure gets `&mut S` — the child's own copy-on-write copy of the state, at the same
/// address, with everything it points to. What the child writes (heap objects, statics) only
/// it sees; the zygote's state and every sibling's stay as they were, and the child's copy goes
/// with it when it ends. [`Zygote::new`] is the snapshot call: it seals the task's process memory,
/// so later spawns share it by reference until the zygote changes it.
///
/// ```no_run
/// use alloc::string::String;
/// use hashbrown::HashMap;
/// use libos::process::Zygote;
///
/// let mut index = HashMap::new();
/// index.insert(String::from("answer"), 42);
/// let mut zygote = Zygote::new(index);
/// let h = zygote
///     .spawn(&[], |index| {
///         index.insert(String::from("mine"), 1); // this child's copy only
///         index["answer"]
///     })
///     .expect("spawn");
/// assert_eq!(h.join(), Ok(42));
/// assert!(!zygote.state().contains_key("mine"));
/// ```
///
/// The state must be `Send`: not because it crosses to another CPU, but because `Send` is how
/// the compiler tells values that may have a second owner in another task's memory, and every
/// child gets a bitwise copy of the state. libos handles (a [`Template`], a socket, a
/// `JoinHandle`) and shared collections are not `Send` (a child's copy would be inert or, for a
/// shared collection, a second owner of shared memory): keep them beside the zygote, and give
/// the children what they need with [`spawn_with`](Zygote::spawn_with) or a
/// [`Shared`](crate::shared::Shared) value.
///
/// ```compile_fail,E0277
/// # use libos::process::Zygote;
/// let (tx, _rx) = libos::channel::bounded::<u64>(1);
/// let _ = Zygote::new(tx); // refused: a channel end is a handle, not `Send`
/// ```
///
/// The zygote is neither `Send` nor `Sync`, so it cannot be captured by a task's closure or put
/// in a static, and [`spawn`](Zygote::spawn) takes `&mut self`, so no `&S` borrowed from it can
/// be alive (and so captured) meanwhile: the closure's `&mut S` is the only way to the child's
/// copy.
///
/// ```compile_fail
/// # use libos::process::Zygote;
/// let mut z = Zygote::new(alloc::vec![1u8]);
/// let shared: &'static Zygote<alloc::vec::Vec<u8>> = alloc::boxed::Box::leak(alloc::boxed::Box::new(z));
/// let v: &'static alloc::vec::Vec<u8> = shared.state();
/// // A `&'static` borrow of the state cannot meet the child's `&mut`: `spawn` needs `&mut self`.
/// let _ = shared.spawn(&[], move |s| i32::from(s[0] == v[0]));
/// ```
pub struct Zygote<S: Send + 'static> {
    state: core::ptr::NonNull<S>,
    _own: core::marker::PhantomData<(alloc::boxed::Box<S>, *const ())>,
}

impl<S: Send + 'static> core::fmt::Debug for Zygote<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Zygote")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<S: Send + 'static> Zygote<S> {
    /// Moves `state` into this task's heap and seals the task's process memory (the snapshot:
    /// its cost grows with the memory the task has written since it last spawned or sealed).
    pub fn new(state: S) -> Zygote<S> {
        let state = alloc::boxed::Box::new(state);
        let z = Zygote {
            state: core::ptr::NonNull::from(alloc::boxed::Box::leak(state)),
            _own: core::marker::PhantomData,
        };
        // A seal that fails (out of frames) only means the first spawn takes the snapshot.
        let _ = seal();
        z
    }

    /// The warm state (the zygote's own copy).
    pub fn state(&self) -> &S {
        // SAFETY: `state` came from `Box::leak` in `new` and is owned by this zygote; `&self`
        // allows shared access only.
        unsafe { self.state.as_ref() }
    }

    /// The warm state, to change it (children spawned afterwards see the change).
    pub fn state_mut(&mut self) -> &mut S {
        // SAFETY: as for `state`; `&mut self` makes the access exclusive.
        unsafe { self.state.as_mut() }
    }

    /// Spawns a child that runs `f` on its own copy of the state (see the type's docs), with
    /// `templates` attached, as [`crate::task::spawn`] does.
    pub fn spawn<F>(
        &mut self,
        templates: &[&Template],
        f: F,
    ) -> Result<crate::task::JoinHandle, crate::task::SpawnError>
    where
        F: FnOnce(&mut S) -> i32 + Send + 'static,
    {
        self.spawn_with_builder(crate::task::Builder::new(), templates, f)
    }

    /// [`spawn`](Self::spawn) with the options of `builder` (stack size, share mode).
    pub fn spawn_with_builder<F>(
        &mut self,
        builder: crate::task::Builder,
        templates: &[&Template],
        f: F,
    ) -> Result<crate::task::JoinHandle, crate::task::SpawnError>
    where
        F: FnOnce(&mut S) -> i32 + Send + 'static,
    {
        let at = self.state.as_ptr() as usize;
        builder.spawn(templates, move || {
            // SAFETY: this runs in the child, a fork of the zygote's memory: the boxed state is
            // live at `at` in the child's own copy of the heap. Nothing else in the child can
            // reach it: the zygote is neither `Send` nor `Sync` (so not captured, not in a
            // static), and `spawn` held `&mut self`, so no borrow of the state was captured.
            let state = unsafe { &mut *(at as *mut S) };
            f(state)
        })
    }

    /// [`spawn`](Self::spawn) that also gives the child `arg` — libos objects such as a
    /// [`TcpStream`](crate::net::TcpStream) or a channel end, which a closure cannot capture —
    /// as [`crate::task::spawn_with`] does: `f` gets the child's copy of the state and `arg`,
    /// whose objects are the child's before it runs. On an error nothing was spawned and `arg`
    /// is dropped here.
    ///
    /// ```no_run
    /// use libos::process::Zygote;
    ///
    /// let mut zygote = Zygote::new(7u64);
    /// let (tx, rx) = libos::channel::bounded::<u64>(1);
    /// let h = zygote
    ///     .spawn_with(&[], tx, |state, tx| i32::from(tx.send(*state).is_ok()))
    ///     .expect("spawn");
    /// assert_eq!(rx.recv(), Some(7));
    /// assert_eq!(h.join(), Ok(1));
    /// ```
    pub fn spawn_with<A, F>(
        &mut self,
        templates: &[&Template],
        arg: A,
        f: F,
    ) -> Result<crate::task::JoinHandle, crate::task::SpawnError>
    where
        A: crate::handle::Give + 'static,
        F: FnOnce(&mut S, A) -> i32 + Send + 'static,
    {
        let at = self.state.as_ptr() as usize;
        crate::task::Builder::new().spawn_with(templates, arg, move |arg| {
            // SAFETY: this runs in the child, a fork of the zygote's memory: the boxed state is
            // live at `at` in the child's own copy of the heap, and (as in
            // `spawn_with_builder`) the zygote is neither `Send` nor `Sync` and this call held
            // `&mut self`, so neither `f` nor `arg` (handles only) can hold a borrow of it.
            let state = unsafe { &mut *(at as *mut S) };
            f(state, arg)
        })
    }

    /// Takes the state back out of the zygote.
    pub fn into_inner(self) -> S {
        let me = core::mem::ManuallyDrop::new(self);
        // SAFETY: the box leaked in `new`, owned by this zygote, which is forgotten (not dropped).
        *unsafe { alloc::boxed::Box::from_raw(me.state.as_ptr()) }
    }
}

impl<S: Send + 'static> Drop for Zygote<S> {
    fn drop(&mut self) {
        // SAFETY: the box leaked in `new`, owned by this zygote and dropped once, here.
        drop(unsafe { alloc::boxed::Box::from_raw(self.state.as_ptr()) });
    }
}

/// Seals the running task's process memory now (the snapshot a spawn would take), so that the
/// next spawns share it by reference until the task changes it.
///
/// ```no_run
/// libos::process::seal().expect("memory for the snapshot");
/// ```
pub fn seal() -> Result<(), Error> {
    // Until an error is in the task's heap, a kill waits (it would leak the kernel's copy).
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        crate::arch::irq::without(|_| {
            let (t, flush) = crate::space::with_current(crate::procmem::fork_template)?;
            crate::space::apply(flush);
            drop(t);
            Ok(())
        })
    };
    r.map_err(crate::space::rehome_error)
}
