//! Owned libos objects: a kernel-side registry, and the app-facing handle [`Owned`].
//!
//! A task's memory (its heap, its copy of the app's statics) may be *forked*: a spawned task
//! starts with a copy-on-write copy of its parent's, so every value in it is copied **bitwise**
//! into the child. A libos object that pointed at kernel memory from such a value (an `Arc`, a
//! `Box`, a socket whose drop closes it) would then exist twice, and the child dropping its copy
//! would free or close what the parent still uses. So an app never holds a libos object itself,
//! only an [`Owned`] handle: plain data (a registry id), safe to copy bitwise. The object lives
//! here, in the kernel heap, with the id of the task that **owns** it.
//!
//! The rules:
//!
//! - **Creation**: the task that creates an object owns it.
//! - **Use**: only the owner may use it ([`Owned::with`], [`Owned::take`]). Any other task — a
//!   child holding a forked copy of the handle — gets [`HandleError::NotOwner`] (from
//!   [`Owned::try_with`]; the libos types that wrap a handle answer their own error value, or
//!   panic, which ends only that task, with a message naming the object, its id and its owner).
//! - **Drop**: the owner dropping its handle drops the object; anyone else dropping a copy does
//!   nothing (a forked copy is inert).
//! - **Give**: a handle crosses into another task only by an explicit give: [`Give::give_to`]
//!   makes `task` the owner of every object reachable from a value (a spawn that hands a value
//!   to its child does this before the child runs). [`Owned`] is neither `Send` nor `Sync`, so a
//!   `task::spawn` closure (which is `Send`) cannot capture one.
//! - **Death**: when a task ends, however it ends (return, panic, fault, kill), the kernel drops
//!   every object it still owns (`release_all`): its sockets close, its channel ends go away.
//!
//! Ids count up from 1 and are never reused, so a stale copy of a handle never reaches a newer
//! object. Every registry operation runs with interrupts off and never drops an object while it
//! holds the registry's lock (a destructor may use the registry again); none may be used from an
//! interrupt handler.
//!
//! [`Owned`] is generic: any libos type that must not be duplicated by a fork wraps one, e.g.
//! `struct TcpStream(Owned<StreamState>)`.
//!
//! ```no_run
//! let (tx, rx) = libos::channel::bounded::<u64>(1); // two objects, owned by this task
//! assert!(libos::handle::owned_by(libos::task::current()) >= 2);
//! # drop((tx, rx));
//! ```

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;
use core::marker::PhantomData;

/// Why a handle could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    /// The calling task does not own the object: it holds a forked copy of the handle, or the
    /// object was given to another task.
    NotOwner {
        /// What the object is (its type).
        object: &'static str,
        /// Its registry id.
        id: u64,
        /// The task that owns it.
        owner: u64,
        /// The task that tried to use it.
        caller: u64,
    },
    /// The object no longer exists (its owner dropped it or ended).
    Gone {
        /// What the object was (its type).
        object: &'static str,
        /// Its registry id.
        id: u64,
    },
    /// The object is in use by a [`Owned::with`] that has not returned (a nested use of the same
    /// object).
    Busy {
        /// What the object is (its type).
        object: &'static str,
        /// Its registry id.
        id: u64,
    },
}

impl fmt::Display for HandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::NotOwner {
                object,
                id,
                owner,
                caller,
            } => write!(
                f,
                "{object} #{id} is owned by task {owner}, not by task {caller} (a forked copy of \
                 a handle is inert: give the object to a task to let it use it)"
            ),
            HandleError::Gone { object, id } => {
                write!(
                    f,
                    "{object} #{id} no longer exists (dropped, or its owner ended)"
                )
            }
            HandleError::Busy { object, id } => {
                write!(
                    f,
                    "{object} #{id} is already in use by this task (nested use)"
                )
            }
        }
    }
}

/// An object in the registry, as the kernel keeps it.
type Object = Box<dyn Any + Send>;

struct Entry {
    owner: u64,
    object_name: &'static str,
    /// The task inside a `with` on this object, if any.
    busy_by: Option<u64>,
    /// Dropped (by its owner, or with its dead owner) while busy: dropped when the `with` ends.
    doomed: bool,
    object: Object,
}

/// The registry: every owned object by id, and an index by owner. The pure part: callers pass
/// the calling task's id, so the host tests can play any task.
pub(crate) struct Registry {
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
    /// (owner, id) of every entry.
    by_owner: BTreeSet<(u64, u64)>,
    /// (task, id) of every entry a task is inside a `with` of.
    busy: BTreeSet<(u64, u64)>,
}

impl Registry {
    pub(crate) const fn new() -> Registry {
        Registry {
            next_id: 1,
            entries: BTreeMap::new(),
            by_owner: BTreeSet::new(),
            busy: BTreeSet::new(),
        }
    }

    /// Adds `object`, owned by `owner`; returns its id (never used before).
    fn insert(&mut self, owner: u64, object_name: &'static str, object: Object) -> u64 {
        let id = self.next_id;
        // One id per object created since boot: 2^64 creations do not happen.
        self.next_id = id
            .checked_add(1)
            .expect("handle registry: 2^64 object ids used up");
        self.entries.insert(
            id,
            Entry {
                owner,
                object_name,
                busy_by: None,
                doomed: false,
                object,
            },
        );
        self.by_owner.insert((owner, id));
        id
    }

    /// The entry `id` if `caller` owns it.
    fn owned_by(
        &mut self,
        id: u64,
        caller: u64,
        name: &'static str,
    ) -> Result<&mut Entry, HandleError> {
        match self.entries.get_mut(&id) {
            None => Err(HandleError::Gone { object: name, id }),
            Some(e) if e.doomed => Err(HandleError::Gone {
                object: e.object_name,
                id,
            }),
            Some(e) if e.owner != caller => Err(HandleError::NotOwner {
                object: e.object_name,
                id,
                owner: e.owner,
                caller,
            }),
            Some(e) => Ok(e),
        }
    }

    /// The owner of `id`, if it exists.
    fn owner(&self, id: u64) -> Option<u64> {
        self.entries.get(&id).filter(|e| !e.doomed).map(|e| e.owner)
    }

    /// Marks `id` busy for `caller` (its owner) and returns a pointer to the object.
    fn begin_use(
        &mut self,
        id: u64,
        caller: u64,
        name: &'static str,
    ) -> Result<*mut (dyn Any + Send), HandleError> {
        let e = self.owned_by(id, caller, name)?;
        if e.busy_by.is_some() {
            return Err(HandleError::Busy {
                object: e.object_name,
                id,
            });
        }
        e.busy_by = Some(caller);
        let p: *mut (dyn Any + Send) = &mut *e.object;
        self.busy.insert((caller, id));
        Ok(p)
    }

    /// Ends a use begun by `caller`; returns the object if it was dropped meanwhile (for the
    /// caller to drop, outside the lock).
    fn end_use(&mut self, id: u64, caller: u64) -> Option<Object> {
        self.busy.remove(&(caller, id));
        let e = self.entries.get_mut(&id)?;
        if e.busy_by != Some(caller) {
            return None;
        }
        e.busy_by = None;
        if e.doomed { self.remove(id) } else { None }
    }

    fn remove(&mut self, id: u64) -> Option<Object> {
        let e = self.entries.remove(&id)?;
        self.by_owner.remove(&(e.owner, id));
        if let Some(t) = e.busy_by {
            self.busy.remove(&(t, id));
        }
        Some(e.object)
    }

    /// Removes `id` if `caller` owns it and it is not in use (then returns the object). Busy:
    /// doomed, dropped when the use ends. Not the owner (a forked copy): nothing.
    fn drop_if_owner(&mut self, id: u64, caller: u64) -> Option<Object> {
        let e = self.entries.get_mut(&id)?;
        if e.owner != caller || e.doomed {
            return None;
        }
        if e.busy_by.is_some() {
            e.doomed = true;
            return None;
        }
        self.remove(id)
    }

    /// Removes `id` and returns the object if `caller` owns it and it is not in use.
    fn take(&mut self, id: u64, caller: u64, name: &'static str) -> Result<Object, HandleError> {
        let e = self.owned_by(id, caller, name)?;
        if e.busy_by.is_some() {
            return Err(HandleError::Busy {
                object: e.object_name,
                id,
            });
        }
        Ok(self.remove(id).expect("the entry was just found"))
    }

    /// Makes `to` the owner of `id`, which `caller` owns.
    fn give(
        &mut self,
        id: u64,
        caller: u64,
        to: u64,
        name: &'static str,
    ) -> Result<(), HandleError> {
        let e = self.owned_by(id, caller, name)?;
        e.owner = to;
        self.by_owner.remove(&(caller, id));
        self.by_owner.insert((to, id));
        Ok(())
    }

    /// Takes out every object `task` (which has ended) owns, for the caller to drop outside the
    /// lock. An object another, live task is inside a `with` of (it was given away during that
    /// use) is doomed instead and dropped when that use ends; uses by `task` itself are over.
    fn release_all(&mut self, task: u64) -> Vec<Object> {
        let mut out = Vec::new();
        let busy: Vec<u64> = self
            .busy
            .range((task, 0)..=(task, u64::MAX))
            .map(|&(_, id)| id)
            .collect();
        for id in busy {
            if let Some(obj) = self.end_use(id, task) {
                out.push(obj);
            }
        }
        let owned: Vec<u64> = self
            .by_owner
            .range((task, 0)..=(task, u64::MAX))
            .map(|&(_, id)| id)
            .collect();
        for id in owned {
            let e = self.entries.get_mut(&id).expect("indexed entries exist");
            if e.busy_by.is_some() {
                e.doomed = true;
                // No owner any more: the next release_all of `task` (an id is never reused, but
                // be exact) must not see it.
                e.owner = u64::MAX;
                self.by_owner.remove(&(task, id));
                self.by_owner.insert((u64::MAX, id));
            } else if let Some(obj) = self.remove(id) {
                out.push(obj);
            }
        }
        out
    }

    /// Number of live objects `task` owns.
    fn count_owned(&self, task: u64) -> usize {
        self.by_owner.range((task, 0)..=(task, u64::MAX)).count()
    }

    /// Number of objects in the registry.
    fn len(&self) -> usize {
        self.entries.len()
    }
}

// ---- The one registry and the running task's id: the kernel's, or a test's fake. ----

#[cfg(target_os = "none")]
static REGISTRY: crate::arch::irq::IrqMutex<Registry> =
    crate::arch::irq::IrqMutex::new(Registry::new());

#[cfg(target_os = "none")]
fn current_task() -> u64 {
    crate::arch::cpu::running_task()
}

#[cfg(target_os = "none")]
fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    // The lock keeps interrupts off while held.
    f(&mut REGISTRY.lock())
}

#[cfg(not(target_os = "none"))]
std::thread_local! {
    /// Each test thread has its own registry and its own fake running task.
    static TEST_REGISTRY: core::cell::RefCell<Registry> = const { core::cell::RefCell::new(Registry::new()) };
    static TEST_CURRENT: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

#[cfg(not(target_os = "none"))]
fn current_task() -> u64 {
    TEST_CURRENT.with(|c| c.get())
}

#[cfg(not(target_os = "none"))]
fn with_registry<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    TEST_REGISTRY.with(|r| f(&mut r.borrow_mut()))
}

/// Makes the host tests' fake running task `task`.
#[cfg(not(target_os = "none"))]
pub(crate) fn set_test_current(task: u64) {
    TEST_CURRENT.with(|c| c.set(task));
}

/// Drops every object `task` still owns. Called by the task glue when a task ends, whatever the
/// way (return, panic, fault, kill), after it stopped running. The objects are dropped after the
/// registry's lock is released, in id order (oldest first).
pub(crate) fn release_all(task: u64) {
    let _k = crate::mm::ctx::kernel();
    let objects = with_registry(|r| r.release_all(task));
    drop(objects);
}

/// Number of live libos objects `task` owns (sockets, channel ends, shared heaps, ...).
///
/// ```no_run
/// let before = libos::handle::owned_by(libos::task::current());
/// let (tx, rx) = libos::channel::bounded::<u64>(1);
/// assert_eq!(libos::handle::owned_by(libos::task::current()), before + 2);
/// ```
pub fn owned_by(task: u64) -> usize {
    let _k = crate::mm::ctx::kernel();
    with_registry(|r| r.count_owned(task))
}

/// Number of live libos objects in the registry, every task's together.
///
/// ```no_run
/// libos::println!("{} libos objects alive", libos::handle::live_objects());
/// ```
pub fn live_objects() -> usize {
    let _k = crate::mm::ctx::kernel();
    with_registry(|r| r.len())
}

/// A handle to a libos object of type `T` in the kernel's registry: plain data (its id), safe to
/// copy bitwise (as a fork does), neither `Send` nor `Sync`. See the module docs for who may use
/// it; a libos type wraps one and documents the rule again.
///
/// A `task::spawn` closure cannot capture one (it must be `Send`):
///
/// ```compile_fail,E0277
/// let (tx, _rx) = libos::channel::bounded::<u32>(1);
/// let t = libos::task::spawn(&[], move || {
///     i32::from(tx.send(1).is_ok()) // a channel end is an `Owned` handle, not `Send`: refused
/// });
/// ```
pub struct Owned<T: Send + 'static> {
    id: u64,
    _p: Marker<T>,
}

/// Names `T` without owning one (`fn() -> T`), and is neither `Send` nor `Sync` (`*const ()`).
type Marker<T> = PhantomData<(fn() -> T, *const ())>;

impl<T: Send + 'static> fmt::Debug for Owned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owned")
            .field("object", &core::any::type_name::<T>())
            .field("id", &self.id)
            .finish()
    }
}

impl<T: Send + 'static> Owned<T> {
    /// Puts `value` in the registry, owned by the running task. libos's own: the object lives in
    /// the kernel heap and may be given to any task, so it must hold nothing of a task's process
    /// memory (an app value could point into its owner's heap).
    pub(crate) fn new(value: T) -> Owned<T> {
        let _k = crate::mm::ctx::kernel();
        let caller = current_task();
        let object: Object = Box::new(value);
        let id = with_registry(|r| r.insert(caller, core::any::type_name::<T>(), object));
        Owned {
            id,
            _p: PhantomData,
        }
    }

    /// The object's registry id (unique since boot, never reused).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The task that owns the object, or `None` once it is gone.
    pub fn owner(&self) -> Option<u64> {
        with_registry(|r| r.owner(self.id))
    }

    /// True when the running task owns the object (so `with` and `take` work).
    pub fn is_mine(&self) -> bool {
        self.owner() == Some(current_task())
    }

    /// Runs `f` on the object. Only the owner may: any other task gets
    /// [`HandleError::NotOwner`]; a use inside a `with` of the same object gets
    /// [`HandleError::Busy`]. `f` runs without the registry's lock (it may block, yield, or use
    /// other handles).
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, HandleError> {
        let _k = crate::mm::ctx::kernel();
        let caller = current_task();
        let name = core::any::type_name::<T>();
        let p = with_registry(|r| r.begin_use(self.id, caller, name))?;
        // SAFETY: `begin_use` marked the entry busy for this task, so until `end_use` below no
        // other `with`, `take`, drop or release removes, moves or lends the boxed object (a drop
        // or a release meanwhile only dooms it); the box's heap allocation does not move while
        // the entry sits in the map. Only this task uses the pointer, and the entry was created
        // by `Owned::<T>::new` for this id, so the downcast finds a `T`.
        let obj = unsafe { &mut *p };
        let r = obj.downcast_mut::<T>().map(f);
        let doomed = with_registry(|r| r.end_use(self.id, caller));
        drop(doomed);
        r.ok_or(HandleError::Gone {
            object: name,
            id: self.id,
        })
    }

    /// As [`try_with`](Self::try_with), panicking (which ends only the running task) with the
    /// error's message if the running task may not use the object.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        match self.try_with(f) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Takes the object out of the registry (owner only; else the error, and the handle is
    /// consumed without effect, as a drop by a non-owner is).
    pub fn try_take(self) -> Result<T, HandleError> {
        let _k = crate::mm::ctx::kernel();
        let caller = current_task();
        let name = core::any::type_name::<T>();
        let id = self.id;
        core::mem::forget(self);
        let obj = with_registry(|r| r.take(id, caller, name))?;
        obj.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| HandleError::Gone { object: name, id })
    }

    /// As [`try_take`](Self::try_take), panicking with the error's message.
    pub fn take(self) -> T {
        match self.try_take() {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Gives the object to `task`, or says why the running task cannot.
    pub fn try_give_to(&self, task: u64) -> Result<(), HandleError> {
        let _k = crate::mm::ctx::kernel();
        let caller = current_task();
        with_registry(|r| r.give(self.id, caller, task, core::any::type_name::<T>()))
    }
}

impl<T: Send + 'static> Drop for Owned<T> {
    fn drop(&mut self) {
        let _k = crate::mm::ctx::kernel();
        let caller = current_task();
        let obj = with_registry(|r| r.drop_if_owner(self.id, caller));
        // Outside the lock: the object's destructor may use the registry.
        drop(obj);
    }
}

/// Values whose libos objects can be handed to another task: [`give_to`](Give::give_to) makes
/// `task` the owner of every registry object reachable from the value. A spawn that hands a value
/// to its child calls it before the child runs.
///
/// Giving an object the running task does not own panics (with the reason): a forked copy of a
/// handle cannot be passed on.
///
/// Sealed: libos implements it for its handle types and for `()`, tuples (up to 4), arrays,
/// `Option` and `Vec` of them. (A libos type that wraps an [`Owned`] implements it by forwarding
/// to the handle, plus `sealed::Sealed`, as `net::TcpStream` does.) So a value that is `Give` is made only of handles (which are not
/// `Send` only so that nothing but a give moves them) and containers, which is what lets a spawn
/// move it into the child.
pub trait Give: sealed::Sealed {
    /// Makes `task` the owner of every libos object in `self`.
    fn give_to(&self, task: u64);
}

pub(crate) mod sealed {
    /// Only libos implements [`super::Give`].
    pub trait Sealed {}
    impl<T: Send + 'static> Sealed for super::Owned<T> {}
    impl Sealed for () {}
    impl<T: Sealed> Sealed for Option<T> {}
    impl<T: Sealed, const N: usize> Sealed for [T; N] {}
    impl<T: Sealed> Sealed for alloc::vec::Vec<T> {}
    impl<A: Sealed> Sealed for (A,) {}
    impl<A: Sealed, B: Sealed> Sealed for (A, B) {}
    impl<A: Sealed, B: Sealed, C: Sealed> Sealed for (A, B, C) {}
    impl<A: Sealed, B: Sealed, C: Sealed, D: Sealed> Sealed for (A, B, C, D) {}
}

impl<T: Send + 'static> Give for Owned<T> {
    fn give_to(&self, task: u64) {
        if let Err(e) = self.try_give_to(task) {
            panic!("cannot give: {e}");
        }
    }
}

impl Give for () {
    fn give_to(&self, _task: u64) {}
}

impl<T: Give> Give for Option<T> {
    fn give_to(&self, task: u64) {
        if let Some(v) = self {
            v.give_to(task);
        }
    }
}

impl<T: Give, const N: usize> Give for [T; N] {
    fn give_to(&self, task: u64) {
        self.iter().for_each(|v| v.give_to(task));
    }
}

impl<T: Give> Give for Vec<T> {
    fn give_to(&self, task: u64) {
        self.iter().for_each(|v| v.give_to(task));
    }
}

impl<A: Give> Give for (A,) {
    fn give_to(&self, task: u64) {
        self.0.give_to(task);
    }
}

impl<A: Give, B: Give> Give for (A, B) {
    fn give_to(&self, task: u64) {
        self.0.give_to(task);
        self.1.give_to(task);
    }
}

impl<A: Give, B: Give, C: Give> Give for (A, B, C) {
    fn give_to(&self, task: u64) {
        self.0.give_to(task);
        self.1.give_to(task);
        self.2.give_to(task);
    }
}

impl<A: Give, B: Give, C: Give, D: Give> Give for (A, B, C, D) {
    fn give_to(&self, task: u64) {
        self.0.give_to(task);
        self.1.give_to(task);
        self.2.give_to(task);
        self.3.give_to(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use core::cell::Cell;

    /// Counts its drops.
    struct Probe(Rc<Cell<u32>>);

    // SAFETY: test only: each test thread keeps its probes and their `Rc` counter to itself, so
    // no `Rc` is ever touched from two threads.
    unsafe impl Send for Probe {}

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn probe() -> (Probe, Rc<Cell<u32>>) {
        let c = Rc::new(Cell::new(0));
        (Probe(c.clone()), c)
    }

    /// What a fork does to a handle: a bitwise copy in the child's memory.
    fn forked_copy<T: Send + 'static>(h: &Owned<T>) -> Owned<T> {
        // SAFETY: `Owned` is plain data (an id and a marker); the copy is what a fork leaves in
        // the child, and the point of the type is that both copies may be dropped.
        unsafe { core::ptr::read(h) }
    }

    #[test]
    fn the_owner_uses_takes_and_drops() {
        set_test_current(3);
        let h = Owned::new(41u64);
        assert_eq!(h.owner(), Some(3));
        assert!(h.is_mine());
        h.with(|v| *v += 1);
        assert_eq!(h.try_with(|v| *v), Ok(42));
        assert_eq!(owned_by(3), 1);
        assert_eq!(h.take(), 42);
        assert_eq!(owned_by(3), 0);
        let (p, drops) = probe();
        let h = Owned::new(p);
        assert_eq!(drops.get(), 0);
        drop(h);
        assert_eq!(drops.get(), 1, "the owner's drop drops the object");
        assert_eq!(live_objects(), 0);
    }

    #[test]
    fn another_task_is_refused_with_a_clear_error() {
        set_test_current(1);
        let h = Owned::new(7u32);
        let id = h.id();
        set_test_current(2);
        let e = h.try_with(|v| *v).unwrap_err();
        assert_eq!(
            e,
            HandleError::NotOwner {
                object: "u32",
                id,
                owner: 1,
                caller: 2
            }
        );
        let msg = alloc::format!("{e}");
        assert!(
            msg.contains("u32") && msg.contains(&alloc::format!("#{id}")),
            "{msg}"
        );
        assert!(msg.contains("owned by task 1, not by task 2"), "{msg}");
        assert_eq!(h.try_give_to(2), Err(e));
        set_test_current(1);
        assert_eq!(h.try_with(|v| *v), Ok(7), "the refusal changed nothing");
    }

    #[test]
    #[should_panic(expected = "is owned by task 1, not by task 9")]
    fn with_from_another_task_panics_naming_the_object() {
        set_test_current(1);
        let h = Owned::new(1u8);
        set_test_current(9);
        h.with(|v| *v);
    }

    #[test]
    fn a_forked_copy_is_inert() {
        set_test_current(1);
        let (p, drops) = probe();
        let parent = Owned::new(p);
        let child_copy = forked_copy(&parent);
        set_test_current(2);
        assert!(matches!(
            child_copy.try_with(|_| ()),
            Err(HandleError::NotOwner {
                owner: 1,
                caller: 2,
                ..
            })
        ));
        drop(child_copy);
        assert_eq!(
            drops.get(),
            0,
            "a forked copy's drop must not drop the parent's object"
        );
        set_test_current(1);
        assert!(parent.try_with(|_| ()).is_ok());
        let copy = forked_copy(&parent);
        set_test_current(2);
        assert!(matches!(copy.try_take(), Err(HandleError::NotOwner { .. })));
        set_test_current(1);
        drop(parent);
        assert_eq!(drops.get(), 1);
    }

    #[test]
    fn give_moves_ownership_of_everything_reachable() {
        set_test_current(1);
        let a = Owned::new(1u32);
        let v = alloc::vec![Owned::new(2u32), Owned::new(3u32)];
        let arg = (a, Some(v), [Owned::new(4u32)], ());
        arg.give_to(5);
        assert_eq!(owned_by(1), 0);
        assert_eq!(owned_by(5), 4);
        // The parent's (forked) view is now inert.
        assert!(matches!(
            arg.0.try_with(|v| *v),
            Err(HandleError::NotOwner { owner: 5, .. })
        ));
        set_test_current(5);
        assert_eq!(arg.0.try_with(|v| *v), Ok(1));
        let (a, v, [d], ()) = arg;
        let v = v.unwrap();
        assert_eq!(v[1].try_with(|x| *x), Ok(3));
        assert_eq!(d.take(), 4);
        drop((a, v));
        assert_eq!(live_objects(), 0);
    }

    #[test]
    #[should_panic(expected = "cannot give")]
    fn giving_what_is_not_yours_panics() {
        set_test_current(1);
        let h = Owned::new(0u8);
        set_test_current(2);
        h.give_to(3);
    }

    #[test]
    fn release_all_drops_only_what_the_dead_task_owns() {
        set_test_current(1);
        let (p1, d1) = probe();
        let (p2, d2) = probe();
        let (p3, d3) = probe();
        let mine = Owned::new(p1);
        set_test_current(2);
        let h2 = Owned::new(p2);
        let h3 = Owned::new(p3);
        h3.give_to(1);
        release_all(2);
        assert_eq!((d1.get(), d2.get(), d3.get()), (0, 1, 0));
        assert_eq!(owned_by(2), 0);
        // The dead task's handle values (left in its discarded memory) are inert.
        set_test_current(1);
        assert!(matches!(h2.try_with(|_| ()), Err(HandleError::Gone { .. })));
        drop(h2);
        assert_eq!(d2.get(), 1);
        release_all(1);
        assert_eq!((d1.get(), d3.get()), (1, 1));
        assert_eq!(live_objects(), 0);
        drop((mine, h3)); // stale: nothing left to drop
        assert_eq!((d1.get(), d2.get(), d3.get()), (1, 1, 1));
    }

    #[test]
    fn a_task_that_dies_inside_with_is_released() {
        set_test_current(4);
        let (p, drops) = probe();
        let h = Owned::new(p);
        let id = h.id();
        // The task ends (panic, kill) in the middle of a use: `end_use` never runs.
        let _ = with_registry(|r| r.begin_use(id, 4, "Probe")).unwrap();
        core::mem::forget(h);
        release_all(4);
        assert_eq!(drops.get(), 1);
        assert_eq!(live_objects(), 0);
    }

    #[test]
    fn dropping_during_a_use_waits_for_the_use_to_end() {
        set_test_current(1);
        let (p, drops) = probe();
        let h = Owned::new(p);
        let copy = forked_copy(&h);
        h.with(|_| {
            // Same task, same id: what a fork-then-give could leave behind. Nested use is
            // refused, and a drop is put off until the use ends.
            assert!(matches!(
                copy.try_with(|_| ()),
                Err(HandleError::Busy { .. })
            ));
            drop(forked_copy(&copy));
            assert_eq!(drops.get(), 0, "not dropped while in use");
        });
        assert_eq!(drops.get(), 1, "dropped when the use ended");
        assert!(matches!(h.try_with(|_| ()), Err(HandleError::Gone { .. })));
        drop((h, copy));
        assert_eq!(drops.get(), 1);
    }

    #[test]
    fn an_object_given_away_during_a_use_and_released_is_dropped_after_the_use() {
        set_test_current(1);
        let (p, drops) = probe();
        let h = Owned::new(p);
        h.with(|_| {
            h.give_to(2);
            release_all(2); // the child died while the parent was still inside `with`
            assert_eq!(drops.get(), 0);
        });
        assert_eq!(drops.get(), 1);
        assert_eq!(live_objects(), 0);
    }

    #[test]
    fn a_destructor_may_use_the_registry() {
        // (An `Owned` cannot hold an `Owned`: it is not `Send`. A destructor may still use the
        // registry, e.g. to make and drop other objects.)
        struct Reenter(Rc<Cell<u32>>);
        // SAFETY: test only: the `Rc` counter never leaves this test's thread.
        unsafe impl Send for Reenter {}
        impl Drop for Reenter {
            fn drop(&mut self) {
                let h = Owned::new(5u8);
                self.0.set(self.0.get() + u32::from(h.take()));
            }
        }
        set_test_current(1);
        let seen = Rc::new(Cell::new(0));
        drop(Owned::new(Reenter(seen.clone())));
        assert_eq!(seen.get(), 5);
        core::mem::forget(Owned::new(Reenter(seen.clone())));
        release_all(1);
        assert_eq!(seen.get(), 10);
        assert_eq!(live_objects(), 0);
    }

    #[test]
    fn ids_are_never_reused() {
        set_test_current(1);
        let mut seen = alloc::collections::BTreeSet::new();
        for round in 0..50u32 {
            let a = Owned::new(round);
            let b = Owned::new(round);
            assert!(seen.insert(a.id()) && seen.insert(b.id()));
            let stale = forked_copy(&a);
            drop(a);
            if round % 2 == 0 {
                release_all(1);
            }
            // A stale handle never reaches a newer object.
            let c = Owned::new(round + 1000);
            assert!(seen.insert(c.id()));
            assert!(matches!(
                stale.try_with(|v| *v),
                Err(HandleError::Gone { .. })
            ));
            drop(stale);
            assert_eq!(c.try_with(|v| *v), Ok(round + 1000));
            core::mem::forget((b, c));
        }
        release_all(1);
        assert_eq!(live_objects(), 0);
    }

    // ---- A proptest: random programs of several tasks against a plain model ----

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Create { task: u64 },
        Use { h: usize, task: u64 },
        Fork { h: usize },
        Give { h: usize, task: u64, to: u64 },
        Drop { h: usize, task: u64 },
        Take { h: usize, task: u64 },
        Release { task: u64 },
    }

    const TASKS: u64 = 4;

    fn op() -> impl Strategy<Value = Op> {
        let t = 0..TASKS;
        let h = 0..16usize;
        prop_oneof![
            t.clone().prop_map(|task| Op::Create { task }),
            (h.clone(), t.clone()).prop_map(|(h, task)| Op::Use { h, task }),
            h.clone().prop_map(|h| Op::Fork { h }),
            (h.clone(), t.clone(), t.clone()).prop_map(|(h, task, to)| Op::Give { h, task, to }),
            (h.clone(), t.clone()).prop_map(|(h, task)| Op::Drop { h, task }),
            (h, t.clone()).prop_map(|(h, task)| Op::Take { h, task }),
            t.prop_map(|task| Op::Release { task }),
        ]
    }

    /// What the registry should hold: per object id, its owner while alive, and its drop counter.
    struct Model {
        owner: alloc::collections::BTreeMap<u64, Option<u64>>,
        drops: alloc::collections::BTreeMap<u64, Rc<Cell<u32>>>,
    }

    impl Model {
        fn alive_owner(&self, id: u64) -> Option<u64> {
            self.owner.get(&id).copied().flatten()
        }

        fn check(&self) -> Result<(), TestCaseError> {
            for (id, owner) in &self.owner {
                let want = u32::from(owner.is_none());
                prop_assert_eq!(
                    self.drops[id].get(),
                    want,
                    "object {} dropped {} times",
                    id,
                    self.drops[id].get()
                );
            }
            for t in 0..TASKS {
                let n = self.owner.values().filter(|o| **o == Some(t)).count();
                prop_assert_eq!(owned_by(t), n, "objects of task {}", t);
            }
            let alive = self.owner.values().filter(|o| o.is_some()).count();
            prop_assert_eq!(live_objects(), alive);
            Ok(())
        }
    }

    fn run(ops: &[Op]) -> Result<(), TestCaseError> {
        for t in 0..TASKS {
            release_all(t);
        }
        prop_assert_eq!(live_objects(), 0);
        let mut m = Model {
            owner: alloc::collections::BTreeMap::new(),
            drops: alloc::collections::BTreeMap::new(),
        };
        // Handle values (several may name one object: forked copies), with the object's id.
        let mut hs: Vec<(Owned<Probe>, u64)> = Vec::new();
        let mut last_id = 0;
        for op in ops {
            match *op {
                Op::Create { task } => {
                    set_test_current(task);
                    let (p, drops) = probe();
                    let h = Owned::new(p);
                    prop_assert!(
                        h.id() > last_id,
                        "ids only grow: {} after {}",
                        h.id(),
                        last_id
                    );
                    last_id = h.id();
                    m.owner.insert(h.id(), Some(task));
                    m.drops.insert(h.id(), drops);
                    hs.push((h, last_id));
                }
                Op::Use { h, task } if h < hs.len() => {
                    set_test_current(task);
                    let (handle, id) = (&hs[h].0, hs[h].1);
                    let r = handle.try_with(|p| p.0.get());
                    match m.alive_owner(id) {
                        Some(o) if o == task => prop_assert_eq!(r, Ok(0)),
                        Some(o) => prop_assert!(
                            matches!(r, Err(HandleError::NotOwner { owner, caller, .. }) if owner == o && caller == task),
                            "{:?}",
                            r
                        ),
                        None => prop_assert!(matches!(r, Err(HandleError::Gone { .. })), "{:?}", r),
                    }
                }
                Op::Fork { h } if h < hs.len() => {
                    let copy = forked_copy(&hs[h].0);
                    hs.push((copy, hs[h].1));
                }
                Op::Give { h, task, to } if h < hs.len() => {
                    set_test_current(task);
                    let id = hs[h].1;
                    let r = hs[h].0.try_give_to(to);
                    if m.alive_owner(id) == Some(task) {
                        prop_assert_eq!(r, Ok(()));
                        m.owner.insert(id, Some(to));
                    } else {
                        prop_assert!(r.is_err());
                    }
                }
                Op::Drop { h, task } if h < hs.len() => {
                    set_test_current(task);
                    let (handle, id) = hs.swap_remove(h);
                    drop(handle);
                    if m.alive_owner(id) == Some(task) {
                        m.owner.insert(id, None);
                    }
                }
                Op::Take { h, task } if h < hs.len() => {
                    set_test_current(task);
                    let (handle, id) = hs.swap_remove(h);
                    let r = handle.try_take();
                    if m.alive_owner(id) == Some(task) {
                        prop_assert!(r.is_ok());
                        drop(r);
                        m.owner.insert(id, None);
                    } else {
                        prop_assert!(r.is_err());
                    }
                }
                Op::Release { task } => {
                    release_all(task);
                    for o in m.owner.values_mut() {
                        if *o == Some(task) {
                            *o = None;
                        }
                    }
                }
                _ => {} // a handle index past the end: nothing to do
            }
            m.check()?;
        }
        for t in 0..TASKS {
            release_all(t);
        }
        prop_assert_eq!(live_objects(), 0);
        // Every handle left is stale now: dropping them all (in any task) drops nothing more.
        set_test_current(0);
        drop(hs);
        for (id, d) in &m.drops {
            prop_assert_eq!(d.get(), 1, "object {} dropped {} times in all", id, d.get());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Owner-only use, inert forked copies, give, take, drop and release_all, in any order
        /// and across tasks, match the model; every object is dropped exactly once, when its
        /// owner drops or takes it or ends.
        #[test]
        fn registry_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            run(&ops)?;
        }
    }
}
