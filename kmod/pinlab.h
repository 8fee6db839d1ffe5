/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pinlab: internal structures.
 *
 * Lock order (outer to inner):
 *   pinlab_region.lock (rwsem) -> pinlab_region.map_lock (mutex)
 *     -> pinlab_dev.reset_lock (mutex) -> pinlab_dev.lock (spinlock)
 *   pinlab_dev.eq_lock (spinlock) and the regions xarray lock are leaves.
 * mmap_lock is never taken while holding map_lock.
 */
#ifndef _PINLAB_H
#define _PINLAB_H

#include <linux/types.h>
#include <linux/pci.h>
#include <linux/miscdevice.h>
#include <linux/kref.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/spinlock.h>
#include <linux/completion.h>
#include <linux/wait.h>
#include <linux/xarray.h>
#include <linux/idr.h>
#include <linux/kfifo.h>
#include <linux/workqueue.h>
#include <linux/mmu_notifier.h>
#include <linux/dma-direction.h>
#include <linux/string.h>

#include "pinlab_uapi.h"

#define PINLAB_DRV_NAME		"pinlab"
#define PINLAB_VENDOR_ID	0x1de5
#define PINLAB_DEVICE_ID	0x0001

/* BAR0 registers */
#define PINLAB_REG_ID		0x000
#define PINLAB_REG_VERSION	0x004
#define PINLAB_REG_STATUS	0x008
#define PINLAB_REG_CTRL		0x00c
#define PINLAB_REG_SQ_BASE	0x010
#define PINLAB_REG_SQ_ENTRIES	0x018
#define PINLAB_REG_SQ_TAIL	0x01c
#define PINLAB_REG_SQ_HEAD	0x020
#define PINLAB_REG_CQ_BASE	0x028
#define PINLAB_REG_CQ_ENTRIES	0x030
#define PINLAB_REG_CQ_HEAD	0x034
#define PINLAB_REG_CQ_TAIL	0x038
#define PINLAB_REG_EQ_BASE	0x040
#define PINLAB_REG_EQ_ENTRIES	0x048
#define PINLAB_REG_EQ_HEAD	0x04c
#define PINLAB_REG_EQ_TAIL	0x050
#define PINLAB_REG_CMDS_DONE	0x060
#define PINLAB_REG_ERRORS	0x064
#define PINLAB_REG_SCRATCH	0x080

#define PINLAB_ID_MAGIC		0x50494e4c	/* "PINL" */
#define PINLAB_VERSION_MAJOR(v)	((v) >> 16)

#define PINLAB_STATUS_ENABLED	BIT(0)
#define PINLAB_STATUS_FATAL	BIT(1)
#define PINLAB_CTRL_ENABLE	BIT(0)
#define PINLAB_CTRL_RESET	BIT(1)

/* opcodes */
#define PINLAB_OP_NOP		0x00
#define PINLAB_OP_CREATE_REGION	0x01
#define PINLAB_OP_MAP_PAGES	0x02
#define PINLAB_OP_INVALIDATE	0x03
#define PINLAB_OP_DESTROY_REGION 0x04
#define PINLAB_OP_DMA_WRITE	0x05
#define PINLAB_OP_DMA_READ	0x06
#define PINLAB_OP_STREAM_START	0x07
#define PINLAB_OP_STREAM_STOP	0x08
#define PINLAB_OP_FENCE		0x09

#define PINLAB_REGION_WRITABLE	BIT(0)	/* CREATE_REGION a1 */
#define PINLAB_PHASE		BIT(0)

/* event types */
#define PINLAB_EV_PAGE_FAULT	1
#define PINLAB_EV_STREAM_STOPPED 2
#define PINLAB_EV_DEVICE_ERROR	3

/* MSI-X vectors */
#define PINLAB_VEC_CQ		0
#define PINLAB_VEC_EQ		1
#define PINLAB_MIN_VECS		1
#define PINLAB_MAX_VECS		4

#define PINLAB_SQ_ENTRIES	256
#define PINLAB_CQ_ENTRIES	256
#define PINLAB_EQ_ENTRIES	256
/* outstanding commands; < SQ_ENTRIES so the SQ can never overflow */
#define PINLAB_NSLOTS		(PINLAB_SQ_ENTRIES - 1)
#define PINLAB_CID_SLOT_BITS	8
#define PINLAB_CID_SLOT_MASK	((1U << PINLAB_CID_SLOT_BITS) - 1)

#define PINLAB_LIVENESS_MS	1000	/* device liveness poll while waiting */
#define PINLAB_MAP_CHUNK	512	/* MAP_PAGES count limit */
#define PINLAB_MAX_PAGES	262144	/* CREATE_REGION npages limit */
#define PINLAB_MAX_REGION_ID	65535
#define PINLAB_NR_EVENTS_STATS	16	/* mmu_notifier_event slots */
#define PINLAB_LAT_BUCKETS	24	/* revoke latency: bucket i < 2^i us */

struct pinlab_sqe {
	u8 opcode;
	u8 flags;
	__le16 cid;
	__le32 region;
	__le64 a[7];
};

struct pinlab_cqe {
	__le16 cid;
	__le16 status;
	__le32 flags;
	__le64 result0;
	__le64 result1;
	__le32 sq_head;
	__le32 rsvd;
};

struct pinlab_eqe {
	__le16 type;
	__le16 rsvd0;
	__le32 flags;
	__le32 region;
	__le32 rsvd1;
	__le64 info0;
	__le64 info1;
};

/* CPU-endian copy of a completion handed to the waiter */
struct pinlab_completion {
	u16 status;
	u64 result0;
	u64 result1;
	u32 epoch;	/* device epoch the command was submitted in */
};

struct pinlab_waiter {
	struct completion done;
	struct pinlab_completion comp;
	int err;	/* -ECANCELED (reset) or -ENODEV (device gone) */
	u32 epoch;
};

struct pinlab_slot {
	struct pinlab_waiter *waiter;	/* NULL once abandoned by a timeout */
	u16 cid;
};

/* EQ entry forwarded from the IRQ to the event work */
struct pinlab_event {
	u16 type;
	u32 region;
	u64 info0;
	u64 info1;
};

enum pinlab_dev_state {
	PINLAB_DEV_RUNNING,
	PINLAB_DEV_RESETTING,
	PINLAB_DEV_DEAD,
};

struct pinlab_stats {
	atomic64_t cmds;
	atomic64_t cmd_errors;
	atomic64_t timeouts;
	atomic64_t resets;
	atomic64_t escalations;
	atomic64_t events;
	atomic64_t events_dropped;
	atomic64_t spurious_cqes;
	atomic64_t pins_held;		/* pages pinned by gup/pin/longterm */
	atomic64_t odp_mapped;		/* pages mapped by odp regions */
	atomic64_t odp_faults_served;
	atomic64_t invalidations[PINLAB_NR_EVENTS_STATS];
	atomic64_t invalidations_nonblock_refused;
	atomic64_t revokes;		/* INVALIDATE fences completed OK */
	atomic64_t revoke_max_us;
	atomic64_t revoke_lat[PINLAB_LAT_BUCKETS];
};

struct pinlab_dev {
	struct pci_dev *pdev;
	void __iomem *bar0;
	int index;
	char name[24];
	struct kref ref;
	struct miscdevice misc;
	bool misc_registered;
	int nvecs;

	struct pinlab_sqe *sq;
	dma_addr_t sq_dma;
	struct pinlab_cqe *cq;
	dma_addr_t cq_dma;
	struct pinlab_eqe *eq;
	dma_addr_t eq_dma;

	/*
	 * protects sq_tail, cq_head, cq_phase, slots[], slot_map, cid_seq,
	 * state, epoch and the SQ/CQ ring contents; taken from the CQ IRQ.
	 */
	spinlock_t lock;
	u32 sq_tail;
	u32 cq_head;
	u32 cq_phase;
	enum pinlab_dev_state state;
	u32 epoch;
	u16 cid_seq;
	struct pinlab_slot slots[PINLAB_NSLOTS];
	DECLARE_BITMAP(slot_map, PINLAB_NSLOTS);
	wait_queue_head_t slot_wq;

	/* protects eq_head, eq_phase, the EQ ring and the events kfifo input */
	spinlock_t eq_lock;
	u32 eq_head;
	u32 eq_phase;
	DECLARE_KFIFO(events, struct pinlab_event, 128);
	struct workqueue_struct *wq;
	struct work_struct event_work;

	/* serializes device resets (re-programming of the queues) */
	struct mutex reset_lock;

	/* region id -> struct pinlab_region; protected by its internal xa_lock */
	struct xarray regions;
	struct ida region_ida;

	struct dentry *debugfs;
	struct pinlab_stats stats;
};

/* per open file */
struct pinlab_file {
	struct pinlab_dev *pd;
};

enum pinlab_region_state {
	PINLAB_REGION_ACTIVE,
	PINLAB_REGION_GONE,	/* deregistered; only refs keep it alive */
};

struct pinlab_region {
	struct kref ref;
	struct pinlab_dev *pd;
	struct pinlab_file *owner;
	u32 id;
	u32 mode;
	u32 flags;
	u32 epoch;		/* device epoch of CREATE_REGION */
	u16 gup_path;		/* PINLAB_GUP_PATH_*: the call that pinned */
	bool writable;
	unsigned long addr;
	unsigned long len;
	unsigned long npages;

	/*
	 * protects state and dev_created; read-held across device commands
	 * that name this region (so DESTROY and id reuse cannot overtake
	 * them), write-held by teardown.
	 */
	struct rw_semaphore lock;
	enum pinlab_region_state state;

	/*
	 * protects pages[], npinned, dma[], mapped, nmapped, list[] (the
	 * coherent MAP_PAGES list), pfns[] and dev_live; held across
	 * MAP_PAGES and INVALIDATE commands.
	 */
	struct mutex map_lock;
	struct page **pages;		/* pinned modes */
	unsigned long npinned;
	dma_addr_t *dma;
	unsigned long *mapped;		/* bitmap: dma[i] valid */
	unsigned long nmapped;
	__le64 *list;
	dma_addr_t list_dma;
	bool dev_live;			/* region exists on the device */

	/* odp */
	struct mmu_interval_notifier notifier;
	bool notifier_inserted;		/* set before use, cleared by teardown */
	struct mm_struct *mm;		/* mmgrab()ed */
	unsigned long *pfns;

	bool dev_created;
	bool dev_used;		/* device may have written: dirty on release */
	atomic64_t invalidations;
	atomic64_t faults;
	atomic_t last_status;
};

/* module parameters (pinlab_main.c) */
extern unsigned int pinlab_cmd_timeout_ms;
extern unsigned int pinlab_fence_timeout_ms;

/* pinlab_main.c */
void pinlab_dev_put(struct pinlab_dev *pd);
void pinlab_dev_get(struct pinlab_dev *pd);

/*
 * Layering: every call goes down this list, never up.  The only upward
 * entries are callbacks the kernel requires: the IRQ handlers, the event
 * work and the mmu_interval_notifier ops.
 *
 *   pinlab_main.c, pinlab_cdev.c	probe/remove, file operations
 *   pinlab_region.c			registration, region commands, events
 *   pinlab_odp.c			device page mappings, odp notifier
 *   pinlab_queue.c			rings, submission, FENCE, reset,
 *					status <-> errno
 */

/* pinlab_region.c */
int pinlab_region_register(struct pinlab_file *pf, struct pinlab_register *arg);
int pinlab_region_deregister(struct pinlab_file *pf, struct pinlab_region_op *arg);
int pinlab_region_dma(struct pinlab_file *pf, struct pinlab_dma *arg, bool write);
int pinlab_region_stream_start(struct pinlab_file *pf, struct pinlab_stream *arg);
int pinlab_region_stream_stop(struct pinlab_file *pf, struct pinlab_region_op *arg);
int pinlab_region_query(struct pinlab_file *pf, struct pinlab_query *arg);
int pinlab_region_dirty(struct pinlab_file *pf, struct pinlab_region_op *arg);
void pinlab_region_release_all(struct pinlab_file *pf);
void pinlab_region_put(struct pinlab_region *r);
void pinlab_event_work(struct work_struct *work);

/* pinlab_odp.c */
void pinlab_unmap_range(struct pinlab_region *r, unsigned long first,
			unsigned long count);
int pinlab_odp_init(struct pinlab_region *r);
void pinlab_odp_fini(struct pinlab_region *r);
int pinlab_odp_map_range(struct pinlab_region *r, unsigned long first,
			 unsigned long count);

/* pinlab_queue.c */
int pinlab_queue_alloc(struct pinlab_dev *pd);
void pinlab_queue_free(struct pinlab_dev *pd);
int pinlab_queue_start(struct pinlab_dev *pd);
void pinlab_queue_kill(struct pinlab_dev *pd);
void pinlab_dev_reset(struct pinlab_dev *pd, const char *why);
void pinlab_dev_halt(struct pinlab_dev *pd, const char *why);
int pinlab_submit(struct pinlab_dev *pd, struct pinlab_sqe *sqe,
		  struct pinlab_completion *comp, unsigned int timeout_ms);
int pinlab_submit_region(struct pinlab_region *r, struct pinlab_sqe *sqe,
			 struct pinlab_completion *comp, unsigned int timeout_ms,
			 u16 *status);
int pinlab_map_pages(struct pinlab_region *r, unsigned long first,
		     unsigned long count);
int pinlab_dev_fence(struct pinlab_dev *pd, struct pinlab_region_op *arg);
int pinlab_status_to_errno(u16 status);
int pinlab_dev_epoch_check(struct pinlab_dev *pd, u32 epoch);
bool pinlab_dev_epoch_gone(struct pinlab_dev *pd, u32 epoch);
irqreturn_t pinlab_cq_irq(int irq, void *data);
irqreturn_t pinlab_eq_irq(int irq, void *data);

static inline void pinlab_sqe_init(struct pinlab_sqe *sqe, u8 opcode)
{
	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = opcode;
}

static inline enum dma_data_direction
pinlab_region_dir(const struct pinlab_region *r)
{
	return r->writable ? DMA_BIDIRECTIONAL : DMA_TO_DEVICE;
}

/* pinlab_cdev.c */
extern const struct file_operations pinlab_fops;

#endif /* _PINLAB_H */
