//! Split virtqueue hot path: vmm-core against `virtio-queue` 0.18.
//!
//! Both read and write the same `vm-memory` `GuestMemoryMmap`: virtio-queue
//! through its public API over it, vmm-core through the production adapter
//! `platform_x86_64::GuestRam`. One iteration: the driver publishes the
//! chain again (writes the head into the next available slot and bumps
//! `avail.idx`), the device pops it, touches every descriptor and returns it
//! to the used ring.
//!
//! After the criterion groups, `cargo bench` also prints the ratio
//! virtio-queue time / vmm-core time per case, measured with a plain timing
//! loop in the same process. It also times vmm-core over `VmBytes`, an
//! adapter that goes through `vm-memory`'s generic `Bytes` API as
//! virtio-queue does, to separate the adapter's share of the difference from
//! the queue's.
//!
//! Caveat: virtio-queue's time moves by 10-50% with unrelated changes to
//! this file, because `vm-memory`'s generic access path is instantiated
//! here and what gets inlined depends on how the crate is split into
//! codegen units. Compare against the fastest virtio-queue time seen.
//!
//! The adapter exists on x86_64 hosts only; elsewhere the bench does nothing.

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::hint::black_box;
    use std::num::Wrapping;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use criterion::{criterion_group, Criterion};
    use platform_x86_64::GuestRam;
    use virtio_queue::{Queue as VqQueue, QueueT};
    use vm_memory::{
        Bytes, GuestAddress as VmAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
    };
    use vmm_core::memory::{checked_end, GuestAddress, GuestMemory, MemoryError};
    use vmm_core::queue::mock::MockSplitQueue;
    use vmm_core::queue::{Descriptor, Queue, QueueState, VIRTQ_DESC_F_WRITE};

    /// vmm-core's view of guest memory through `vm-memory`'s generic `Bytes`
    /// API (what `GuestRam` did before it got its own fast path); for reference.
    struct VmBytes(GuestMemoryMmap);

    impl VmBytes {
        fn fault(addr: GuestAddress, len: usize) -> MemoryError {
            let len = len as u64;
            match checked_end(addr, len) {
                Err(e) => e,
                Ok(_) => MemoryError::OutOfBounds { addr: addr.0, len },
            }
        }
    }

    impl GuestMemory for VmBytes {
        fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
            self.0
                .read_slice(buf, VmAddress(addr.0))
                .map_err(|_| Self::fault(addr, buf.len()))
        }

        fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
            self.0
                .write_slice(buf, VmAddress(addr.0))
                .map_err(|_| Self::fault(addr, buf.len()))
        }

        fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
            checked_end(addr, len)?;
            let oob = MemoryError::OutOfBounds { addr: addr.0, len };
            let count = usize::try_from(len).map_err(|_| oob)?;
            let start = VmAddress(addr.0);
            if self.0.get_slice(start, count).is_ok()
                || GuestMemoryBackend::check_range(&self.0, start, count)
            {
                Ok(())
            } else {
                Err(oob)
            }
        }
    }

    const MEM_SIZE: usize = 1 << 20;
    const QUEUE_SIZE: u16 = 256;
    const QUEUE_BASE: GuestAddress = GuestAddress(0x1000);
    const INDIRECT_TABLE: GuestAddress = GuestAddress(0x8000);
    const BUFFERS: u64 = 0x1_0000;
    /// vmm-core's per-chain capacity.
    const CAPACITY: usize = 16;
    /// Iterations of one run of the plain timing loop.
    const RATIO_ITERATIONS: u32 = 50_000;
    /// Runs per case and implementation; the best one counts. Many short runs
    /// make it likely that some of them see no interference on a busy machine.
    const RATIO_RUNS: u32 = 41;

    #[derive(Clone, Copy)]
    enum Shape {
        Direct(usize),
        Indirect(usize),
    }

    struct Case {
        name: &'static str,
        shape: Shape,
    }

    const CASES: [Case; 4] = [
        Case {
            name: "1-desc",
            shape: Shape::Direct(1),
        },
        Case {
            name: "3-desc",
            shape: Shape::Direct(3),
        },
        Case {
            name: "16-desc",
            shape: Shape::Direct(16),
        },
        Case {
            name: "indirect-8",
            shape: Shape::Indirect(8),
        },
    ];

    /// One chain laid out in guest memory, and where the rings are.
    struct Setup {
        mem: GuestRam,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
        head: u16,
    }

    impl Setup {
        fn new(shape: Shape) -> Setup {
            let gm = GuestMemoryMmap::<()>::from_ranges(&[(VmAddress(0), MEM_SIZE)]).unwrap();
            let mem = GuestRam::new(gm);
            // A request-like chain: one device-readable header, then
            // device-writable data.
            let bufs: Vec<Descriptor> = (0..16u64)
                .map(|i| Descriptor {
                    addr: GuestAddress(BUFFERS + 0x1000 * i),
                    len: 0x200,
                    flags: if i == 0 { 0 } else { VIRTQ_DESC_F_WRITE },
                    next: 0,
                })
                .collect();
            let mut mock = MockSplitQueue::new(&mem, QUEUE_BASE, QUEUE_SIZE).unwrap();
            let head = match shape {
                Shape::Direct(n) => mock.add_chain(&bufs[..n]).unwrap(),
                Shape::Indirect(n) => mock.add_indirect_chain(INDIRECT_TABLE, &bufs[..n]).unwrap(),
            };
            let (desc_table, avail_ring, used_ring) =
                (mock.desc_table().0, mock.avail_ring().0, mock.used_ring().0);
            Setup {
                mem,
                desc_table,
                avail_ring,
                used_ring,
                head,
            }
        }

        fn gm(&self) -> &GuestMemoryMmap {
            self.mem.inner()
        }

        /// The ring indices as they are in memory now: `(avail.idx, used.idx)`.
        fn indices(&self) -> (u16, u16) {
            let read = |addr: u64| u16::from_le(self.gm().read_obj(VmAddress(addr + 2)).unwrap());
            (read(self.avail_ring), read(self.used_ring))
        }

        /// A driver that re-publishes the chain, continuing from memory.
        fn driver(&self) -> Driver<'_> {
            let len = 4 + 2 * usize::from(QUEUE_SIZE);
            Driver {
                avail_ring: self
                    .gm()
                    .get_slice(VmAddress(self.avail_ring), len)
                    .unwrap(),
                idx: Wrapping(self.indices().0),
                head: self.head,
            }
        }

        /// A vmm-core queue that has consumed everything published so far.
        fn vmm_core_queue(&self) -> Queue {
            let (avail, used) = self.indices();
            Queue::from_state(&QueueState {
                max_size: QUEUE_SIZE,
                size: QUEUE_SIZE,
                ready: true,
                desc_table: self.desc_table,
                avail_ring: self.avail_ring,
                used_ring: self.used_ring,
                next_avail: avail,
                next_used: used,
                event_idx: false,
                indirect: true,
            })
            .unwrap()
        }

        /// A virtio-queue queue that has consumed everything published so far.
        fn virtio_queue(&self) -> VqQueue {
            let (avail, used) = self.indices();
            let mut q = VqQueue::new(QUEUE_SIZE).unwrap();
            q.try_set_desc_table_address(VmAddress(self.desc_table))
                .unwrap();
            q.try_set_avail_ring_address(VmAddress(self.avail_ring))
                .unwrap();
            q.try_set_used_ring_address(VmAddress(self.used_ring))
                .unwrap();
            q.set_next_avail(avail);
            q.set_next_used(used);
            q.set_ready(true);
            q
        }
    }

    /// The driver side, shared by both implementations, so it costs both the
    /// same. Like a guest, which stores straight to its RAM, it writes through a
    /// slice of the available ring taken once, rather than looking up the
    /// region on every store: its time is overhead common to both sides, and
    /// the smaller it is the less it dilutes the comparison.
    struct Driver<'a> {
        avail_ring: VolatileSlice<'a>,
        idx: Wrapping<u16>,
        head: u16,
    }

    impl Driver<'_> {
        fn publish(&mut self) {
            let slot = usize::from(self.idx.0 % QUEUE_SIZE);
            self.avail_ring
                .write_obj(self.head.to_le(), 4 + 2 * slot)
                .unwrap();
            self.idx += 1;
            self.avail_ring
                .store(self.idx.0.to_le(), 2, Ordering::Release)
                .unwrap();
        }
    }

    /// Publish, pop, touch every descriptor, return: vmm-core.
    // Both rounds stay out of line, so profiles attribute time to them.
    #[inline(never)]
    fn vmm_core_round<M: GuestMemory>(driver: &mut Driver<'_>, q: &mut Queue, mem: &M) {
        driver.publish();
        // Borrowed where `pop` left it: moving it out of the `Result` and
        // `Option` would copy the whole fixed-capacity chain each time.
        let popped = q.pop::<CAPACITY, _>(mem);
        let Ok(Some(chain)) = &popped else {
            panic!("no chain: {popped:?}")
        };
        let mut acc = 0u64;
        for d in chain.descriptors() {
            acc = acc.wrapping_add(black_box(d.addr.raw()) ^ u64::from(black_box(d.len)));
        }
        black_box(acc);
        q.add_used(mem, chain.head_index(), 0).unwrap();
    }

    /// Publish, pop, touch every descriptor, return: virtio-queue.
    #[inline(never)]
    fn virtio_queue_round(driver: &mut Driver<'_>, q: &mut VqQueue, gm: &GuestMemoryMmap) {
        driver.publish();
        let chain = q.pop_descriptor_chain(gm).unwrap();
        let head = chain.head_index();
        let mut acc = 0u64;
        for d in chain {
            acc = acc.wrapping_add(black_box(d.addr().0) ^ u64::from(black_box(d.len())));
        }
        black_box(acc);
        q.add_used(gm, head, 0).unwrap();
    }

    fn pop_and_return(c: &mut Criterion) {
        let mut group = c.benchmark_group("pop_walk_add_used");
        for case in &CASES {
            let setup = Setup::new(case.shape);
            group.bench_function(format!("vmm-core/{}", case.name), |b| {
                let mut driver = setup.driver();
                let mut q = setup.vmm_core_queue();
                b.iter(|| vmm_core_round(&mut driver, &mut q, &setup.mem));
            });
            group.bench_function(format!("virtio-queue/{}", case.name), |b| {
                let mut driver = setup.driver();
                let mut q = setup.virtio_queue();
                b.iter(|| virtio_queue_round(&mut driver, &mut q, setup.gm()));
            });
        }
        group.finish();
    }

    /// Time of `RATIO_ITERATIONS` rounds.
    fn timed(mut round: impl FnMut()) -> Duration {
        let start = Instant::now();
        for _ in 0..RATIO_ITERATIONS {
            round();
        }
        start.elapsed()
    }

    fn print_ratios() {
        {
            // The driver's share of every round, common to both sides.
            let setup = Setup::new(Shape::Direct(1));
            let mut best = Duration::MAX;
            for _ in 0..RATIO_RUNS {
                let mut driver = setup.driver();
                best = best.min(timed(|| driver.publish()));
            }
            println!(
                "driver publish alone: {:.1} ns (included in every round below)",
                best.as_nanos() as f64 / f64::from(RATIO_ITERATIONS)
            );
        }
        let mut line = String::from("ratio (virtio-queue / vmm-core):");
        for case in &CASES {
            let setup = Setup::new(case.shape);
            // Interleave the two and keep the best of several runs of each, so
            // noise from other processes hits both alike and mostly drops out.
            let (mut vmm_core, mut virtio_queue) = (Duration::MAX, Duration::MAX);
            let mut generic = Duration::MAX;
            let bytes = VmBytes(setup.gm().clone());
            for _ in 0..RATIO_RUNS {
                let mut driver = setup.driver();
                let mut q = setup.vmm_core_queue();
                vmm_core = vmm_core.min(timed(|| vmm_core_round(&mut driver, &mut q, &setup.mem)));
                let mut driver = setup.driver();
                let mut q = setup.vmm_core_queue();
                generic = generic.min(timed(|| vmm_core_round(&mut driver, &mut q, &bytes)));
                let mut driver = setup.driver();
                let mut q = setup.virtio_queue();
                virtio_queue = virtio_queue.min(timed(|| {
                    virtio_queue_round(&mut driver, &mut q, setup.gm())
                }));
            }
            let per = |d: Duration| d.as_nanos() as f64 / f64::from(RATIO_ITERATIONS);
            println!(
                "{:>10}: vmm-core {:6.1} ns, virtio-queue {:6.1} ns per round \
                 (vmm-core over generic vm-memory Bytes: {:6.1} ns)",
                case.name,
                per(vmm_core),
                per(virtio_queue),
                per(generic)
            );
            line.push_str(&format!(
                " {} {:.2}x",
                case.name,
                virtio_queue.as_secs_f64() / vmm_core.as_secs_f64()
            ));
        }
        println!("{line}");
    }

    criterion_group! {
        name = benches;
        config = Criterion::default()
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        targets = pop_and_return
    }

    pub fn main() {
        benches();
        Criterion::default().configure_from_args().final_summary();
        // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
        // only smoke-tests the criterion groups.
        if std::env::args().any(|a| a == "--bench") {
            print_ratios();
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86_64::main();
}
