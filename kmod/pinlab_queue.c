// SPDX-License-Identifier: GPL-2.0
/*
 * pinlab: SQ/CQ/EQ rings, command submission (any command, a command
 * naming a region, MAP_PAGES, the device-wide FENCE), completion and
 * event IRQs, device reset and halt, and the mappings between device
 * status codes and errnos.  The bottom layer: it calls nothing else in
 * the module.  EQ entries are handed up only through pd->event_work, a
 * work item whose function the probe installs.
 */
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/slab.h>

#include "pinlab.h"

#define PINLAB_SQ_BYTES	(PINLAB_SQ_ENTRIES * sizeof(struct pinlab_sqe))
#define PINLAB_CQ_BYTES	(PINLAB_CQ_ENTRIES * sizeof(struct pinlab_cqe))
#define PINLAB_EQ_BYTES	(PINLAB_EQ_ENTRIES * sizeof(struct pinlab_eqe))

static void pinlab_write64(struct pinlab_dev *pd, u32 reg, u64 val)
{
	/* REGISTERS.md: two 4-byte accesses, low word first */
	writel(lower_32_bits(val), pd->bar0 + reg);
	writel(upper_32_bits(val), pd->bar0 + reg + 4);
}

int pinlab_status_to_errno(u16 status)
{
	switch (status) {
	case PINLAB_STATUS_OK:
		return 0;
	case PINLAB_STATUS_BAD_OPCODE:
		return -EOPNOTSUPP;
	case PINLAB_STATUS_BAD_ARG:
		return -EINVAL;
	case PINLAB_STATUS_NO_REGION:
		return -ENOENT;
	case PINLAB_STATUS_EXISTS:
		return -EEXIST;
	case PINLAB_STATUS_DMA_ERROR:
		return -EIO;
	case PINLAB_STATUS_PAGE_FAULT:
		return -EFAULT;
	case PINLAB_STATUS_ABORTED:
		return -ECANCELED;
	case PINLAB_STATUS_NO_SPACE:
		return -ENOSPC;
	case PINLAB_STATUS_TIMEOUT:
		return -ETIMEDOUT;
	case PINLAB_STATUS_NO_DEVICE:
		return -ENODEV;
	default:
		return -EIO;
	}
}

static u16 pinlab_errno_to_pseudo_status(int err)
{
	switch (err) {
	case -ETIMEDOUT:
		return PINLAB_STATUS_TIMEOUT;
	case -ENODEV:
		return PINLAB_STATUS_NO_DEVICE;
	default:
		/* -ECANCELED (reset) or -EIO (region failed by a reset) */
		return PINLAB_STATUS_ABORTED;
	}
}

int pinlab_queue_alloc(struct pinlab_dev *pd)
{
	struct device *dev = &pd->pdev->dev;

	BUILD_BUG_ON(sizeof(struct pinlab_sqe) != 64);
	BUILD_BUG_ON(sizeof(struct pinlab_cqe) != 32);
	BUILD_BUG_ON(sizeof(struct pinlab_eqe) != 32);
	BUILD_BUG_ON(PINLAB_NSLOTS > PINLAB_CID_SLOT_MASK);

	pd->sq = dma_alloc_coherent(dev, PINLAB_SQ_BYTES, &pd->sq_dma,
				    GFP_KERNEL);
	if (!pd->sq)
		goto err;
	pd->cq = dma_alloc_coherent(dev, PINLAB_CQ_BYTES, &pd->cq_dma,
				    GFP_KERNEL);
	if (!pd->cq)
		goto err_sq;
	pd->eq = dma_alloc_coherent(dev, PINLAB_EQ_BYTES, &pd->eq_dma,
				    GFP_KERNEL);
	if (!pd->eq)
		goto err_cq;
	return 0;

err_cq:
	dma_free_coherent(dev, PINLAB_CQ_BYTES, pd->cq, pd->cq_dma);
	pd->cq = NULL;
err_sq:
	dma_free_coherent(dev, PINLAB_SQ_BYTES, pd->sq, pd->sq_dma);
	pd->sq = NULL;
err:
	return -ENOMEM;
}

void pinlab_queue_free(struct pinlab_dev *pd)
{
	struct device *dev = &pd->pdev->dev;

	if (pd->eq)
		dma_free_coherent(dev, PINLAB_EQ_BYTES, pd->eq, pd->eq_dma);
	if (pd->cq)
		dma_free_coherent(dev, PINLAB_CQ_BYTES, pd->cq, pd->cq_dma);
	if (pd->sq)
		dma_free_coherent(dev, PINLAB_SQ_BYTES, pd->sq, pd->sq_dma);
	pd->eq = NULL;
	pd->cq = NULL;
	pd->sq = NULL;
}

/* Fail every outstanding command; caller holds pd->lock. */
static void pinlab_fail_waiters_locked(struct pinlab_dev *pd, int err)
{
	unsigned int i;

	lockdep_assert_held(&pd->lock);
	for_each_set_bit(i, pd->slot_map, PINLAB_NSLOTS) {
		struct pinlab_waiter *w = pd->slots[i].waiter;

		pd->slots[i].waiter = NULL;
		__clear_bit(i, pd->slot_map);
		if (w) {
			w->err = err;
			complete(&w->done);
		}
	}
}

/* Reset ring indexes and contents; caller holds pd->lock, device stopped. */
static void pinlab_rings_clear_locked(struct pinlab_dev *pd)
{
	lockdep_assert_held(&pd->lock);
	memset(pd->sq, 0, PINLAB_SQ_BYTES);
	memset(pd->cq, 0, PINLAB_CQ_BYTES);
	pd->sq_tail = 0;
	pd->cq_head = 0;
	pd->cq_phase = 1;
}

static void pinlab_eq_clear(struct pinlab_dev *pd)
{
	unsigned long flags;

	spin_lock_irqsave(&pd->eq_lock, flags);
	memset(pd->eq, 0, PINLAB_EQ_BYTES);
	pd->eq_head = 0;
	pd->eq_phase = 1;
	spin_unlock_irqrestore(&pd->eq_lock, flags);
}

/* Program the (cleared, disabled) queues and enable the device. */
static int pinlab_queue_program(struct pinlab_dev *pd)
{
	u32 status;

	pinlab_write64(pd, PINLAB_REG_SQ_BASE, pd->sq_dma);
	writel(PINLAB_SQ_ENTRIES, pd->bar0 + PINLAB_REG_SQ_ENTRIES);
	writel(0, pd->bar0 + PINLAB_REG_SQ_TAIL);
	pinlab_write64(pd, PINLAB_REG_CQ_BASE, pd->cq_dma);
	writel(PINLAB_CQ_ENTRIES, pd->bar0 + PINLAB_REG_CQ_ENTRIES);
	writel(0, pd->bar0 + PINLAB_REG_CQ_HEAD);
	pinlab_write64(pd, PINLAB_REG_EQ_BASE, pd->eq_dma);
	writel(PINLAB_EQ_ENTRIES, pd->bar0 + PINLAB_REG_EQ_ENTRIES);
	writel(0, pd->bar0 + PINLAB_REG_EQ_HEAD);
	writel(PINLAB_CTRL_ENABLE, pd->bar0 + PINLAB_REG_CTRL);

	status = readl(pd->bar0 + PINLAB_REG_STATUS);
	if (status == U32_MAX || (status & PINLAB_STATUS_FATAL) ||
	    !(status & PINLAB_STATUS_ENABLED)) {
		dev_err(&pd->pdev->dev, "enable failed, STATUS=%#x\n", status);
		return -EIO;
	}
	return 0;
}

/* First start after probe: device is freshly reset by the caller. */
int pinlab_queue_start(struct pinlab_dev *pd)
{
	unsigned long flags;
	int ret;

	spin_lock_irqsave(&pd->lock, flags);
	pinlab_rings_clear_locked(pd);
	pd->state = PINLAB_DEV_RESETTING;
	spin_unlock_irqrestore(&pd->lock, flags);
	pinlab_eq_clear(pd);

	ret = pinlab_queue_program(pd);

	spin_lock_irqsave(&pd->lock, flags);
	pd->state = ret ? PINLAB_DEV_DEAD : PINLAB_DEV_RUNNING;
	spin_unlock_irqrestore(&pd->lock, flags);
	return ret;
}

/* Device gone (remove or surprise removal): fail everything with -ENODEV. */
void pinlab_queue_kill(struct pinlab_dev *pd)
{
	unsigned long flags;

	spin_lock_irqsave(&pd->lock, flags);
	pd->state = PINLAB_DEV_DEAD;
	pd->epoch++;
	pinlab_fail_waiters_locked(pd, -ENODEV);
	spin_unlock_irqrestore(&pd->lock, flags);
	wake_up_all(&pd->slot_wq);
	pr_debug("%s: device dead\n", pd->name);
}

/*
 * Wait until no reset or halt is in progress.  A reset or halt holds
 * reset_lock from before its state change until the device has been told
 * to stop, so once we own the lock the device has dropped every region of
 * an older epoch.  Process context; the caller may hold a map_lock (the
 * reset path never takes one).
 */
static void pinlab_dev_wait_reset(struct pinlab_dev *pd)
{
	mutex_lock(&pd->reset_lock);
	mutex_unlock(&pd->reset_lock);
}

/*
 * 0 if commands naming a region created in @epoch may be sent, -ENODEV if
 * the device is gone (halted: it issues no more DMA), -EIO if the device
 * was reset since (the device dropped the region).  A reset in progress is
 * waited out first, so that a non-zero return always means the device no
 * longer accesses the region's pages.  May sleep.
 */
int pinlab_dev_epoch_check(struct pinlab_dev *pd, u32 epoch)
{
	unsigned long flags;
	int ret = 0;

	spin_lock_irqsave(&pd->lock, flags);
	if (pd->state == PINLAB_DEV_DEAD)
		ret = -ENODEV;
	else if (pd->state != PINLAB_DEV_RUNNING || pd->epoch != epoch)
		ret = -EIO;
	spin_unlock_irqrestore(&pd->lock, flags);
	if (ret == -EIO)
		pinlab_dev_wait_reset(pd);
	return ret;
}

/*
 * Like pinlab_dev_epoch_check() without sleeping, for non-blockable
 * invalidations: true if the device provably no longer accesses regions
 * of @epoch (reset since, not in progress; or halted).
 */
bool pinlab_dev_epoch_gone(struct pinlab_dev *pd, u32 epoch)
{
	unsigned long flags;
	bool gone;

	spin_lock_irqsave(&pd->lock, flags);
	gone = pd->state == PINLAB_DEV_DEAD ||
	       (pd->state == PINLAB_DEV_RUNNING && pd->epoch != epoch);
	spin_unlock_irqrestore(&pd->lock, flags);
	return gone;
}

/*
 * Reset the function: CTRL.RESET stops all DMA and drops every region,
 * stream and queue on the device.  Every outstanding command fails with
 * -ECANCELED and every region created before the reset becomes failed
 * (its epoch no longer matches).  The queues are then re-enabled.
 */
void pinlab_dev_reset(struct pinlab_dev *pd, const char *why)
{
	unsigned long flags;
	u32 id;
	int ret;

	mutex_lock(&pd->reset_lock);
	spin_lock_irqsave(&pd->lock, flags);
	if (pd->state == PINLAB_DEV_DEAD) {
		spin_unlock_irqrestore(&pd->lock, flags);
		mutex_unlock(&pd->reset_lock);
		return;
	}
	pd->state = PINLAB_DEV_RESETTING;
	pd->epoch++;
	spin_unlock_irqrestore(&pd->lock, flags);

	dev_warn(&pd->pdev->dev, "resetting device: %s\n", why);
	atomic64_inc(&pd->stats.resets);

	writel(PINLAB_CTRL_RESET, pd->bar0 + PINLAB_REG_CTRL);
	/* RESET completes before a following read is answered */
	id = readl(pd->bar0 + PINLAB_REG_ID);

	spin_lock_irqsave(&pd->lock, flags);
	pinlab_fail_waiters_locked(pd, -ECANCELED);
	pinlab_rings_clear_locked(pd);
	spin_unlock_irqrestore(&pd->lock, flags);
	pinlab_eq_clear(pd);

	ret = id == PINLAB_ID_MAGIC ? pinlab_queue_program(pd) : -ENODEV;
	if (ret)
		pci_clear_master(pd->pdev);	/* DEAD means halted */

	spin_lock_irqsave(&pd->lock, flags);
	if (pd->state == PINLAB_DEV_RESETTING)
		pd->state = ret ? PINLAB_DEV_DEAD : PINLAB_DEV_RUNNING;
	spin_unlock_irqrestore(&pd->lock, flags);
	wake_up_all(&pd->slot_wq);
	if (ret)
		dev_err(&pd->pdev->dev, "device dead after reset (%d)\n", ret);
	pr_debug("%s: reset done, state %d\n", pd->name, pd->state);
	mutex_unlock(&pd->reset_lock);
}

static bool pinlab_slot_available(struct pinlab_dev *pd)
{
	unsigned long flags;
	bool avail;

	spin_lock_irqsave(&pd->lock, flags);
	avail = pd->state != PINLAB_DEV_RUNNING ||
		!bitmap_full(pd->slot_map, PINLAB_NSLOTS);
	spin_unlock_irqrestore(&pd->lock, flags);
	return avail;
}

/*
 * Stop the function for good, then fail every waiter with -ENODEV:
 * CTRL.RESET (the device drops every region and stream before it answers
 * the following read) and Bus Master Enable cleared (PCI: a function with
 * it clear issues no memory requests).  Only after both is the device
 * marked DEAD, so DEAD and -ENODEV always mean "no more DMA from it".
 * Process context; takes reset_lock.
 */
void pinlab_dev_halt(struct pinlab_dev *pd, const char *why)
{
	mutex_lock(&pd->reset_lock);
	writel(PINLAB_CTRL_RESET, pd->bar0 + PINLAB_REG_CTRL);
	(void)readl(pd->bar0 + PINLAB_REG_STATUS);
	pci_clear_master(pd->pdev);
	pinlab_queue_kill(pd);
	mutex_unlock(&pd->reset_lock);
	pr_debug("%s: halted: %s\n", pd->name, why);
}

/*
 * A device that vanished (surprise removal, its server died) reads all
 * ones.  Halt it so that every waiter fails with -ENODEV at once instead
 * of at its timeout, and nothing it might still do reaches memory.
 */
static bool pinlab_dev_check_alive(struct pinlab_dev *pd)
{
	unsigned long flags;
	bool dead;

	if (readl(pd->bar0 + PINLAB_REG_ID) == PINLAB_ID_MAGIC)
		return true;
	spin_lock_irqsave(&pd->lock, flags);
	dead = pd->state == PINLAB_DEV_DEAD;
	spin_unlock_irqrestore(&pd->lock, flags);
	if (!dead) {
		dev_err(&pd->pdev->dev,
			"device not responding, halting it\n");
		pinlab_dev_halt(pd, "not responding");
	}
	return false;
}

/*
 * wait_for_completion_timeout() in slices of PINLAB_LIVENESS_MS, checking
 * between slices that the device still answers.  Returns the remaining
 * jiffies (> 0) once @done completed, 0 on timeout.
 */
static unsigned long pinlab_wait_alive(struct pinlab_dev *pd,
				       struct completion *done,
				       unsigned long tmo)
{
	unsigned long slice = msecs_to_jiffies(PINLAB_LIVENESS_MS);
	unsigned long left;

	while (tmo) {
		unsigned long step = min(tmo, slice);

		left = wait_for_completion_timeout(done, step);
		if (left)
			return tmo - step + left;
		tmo -= step;
		if (tmo && !pinlab_dev_check_alive(pd))
			break;	/* pinlab_queue_kill() completed @done */
	}
	return completion_done(done) ? 1 : 0;
}

/*
 * Submit one command and wait for its completion, at most timeout_ms.
 *
 * Returns 0 with the completion in *comp (the device status may be
 * non-zero), or -ENODEV (device halted), -ECANCELED (reset while queued or
 * in flight) or -ETIMEDOUT.  Every error return comes after the device was
 * told to stop: a timeout (no free command slot, or no completion, within
 * @timeout_ms) resets the function before returning, and -ECANCELED /
 * -ENODEV are only returned once the reset or halt that caused them has
 * reached the device.  Callers may therefore release pages on any error.
 */
int pinlab_submit(struct pinlab_dev *pd, struct pinlab_sqe *sqe,
		  struct pinlab_completion *comp, unsigned int timeout_ms)
{
	unsigned long tmo = msecs_to_jiffies(timeout_ms ? timeout_ms : 1);
	struct pinlab_waiter w;
	unsigned long flags;
	bool abandoned = false;
	unsigned int slot;
	u16 cid;

	init_completion(&w.done);
	w.err = 0;

	for (;;) {
		spin_lock_irqsave(&pd->lock, flags);
		if (pd->state == PINLAB_DEV_DEAD) {
			spin_unlock_irqrestore(&pd->lock, flags);
			return -ENODEV;
		}
		if (pd->state == PINLAB_DEV_RESETTING) {
			spin_unlock_irqrestore(&pd->lock, flags);
			pinlab_dev_wait_reset(pd);
			return -ECANCELED;
		}
		slot = find_first_zero_bit(pd->slot_map, PINLAB_NSLOTS);
		if (slot < PINLAB_NSLOTS)
			break;
		spin_unlock_irqrestore(&pd->lock, flags);
		if (!wait_event_timeout(pd->slot_wq, pinlab_slot_available(pd),
					tmo)) {
			/*
			 * Every slot stayed busy: the device completes
			 * nothing.  Reset it, so that a caller giving up
			 * (an invalidation, a destroy) may release pages.
			 */
			atomic64_inc(&pd->stats.timeouts);
			dev_warn(&pd->pdev->dev,
				 "command op %#x region %u: no command slot within %u ms\n",
				 sqe->opcode, le32_to_cpu(sqe->region),
				 timeout_ms);
			pinlab_dev_reset(pd, "command queue full");
			return -ETIMEDOUT;
		}
	}

	__set_bit(slot, pd->slot_map);
	pd->cid_seq++;
	cid = (u16)(pd->cid_seq << PINLAB_CID_SLOT_BITS) | slot;
	pd->slots[slot].cid = cid;
	pd->slots[slot].waiter = &w;
	w.epoch = pd->epoch;
	sqe->cid = cpu_to_le16(cid);
	memcpy(&pd->sq[pd->sq_tail], sqe, sizeof(*sqe));
	pd->sq_tail = (pd->sq_tail + 1) & (PINLAB_SQ_ENTRIES - 1);
	/* writel orders the SQE store before the doorbell */
	writel(pd->sq_tail, pd->bar0 + PINLAB_REG_SQ_TAIL);
	spin_unlock_irqrestore(&pd->lock, flags);
	atomic64_inc(&pd->stats.cmds);

	if (!pinlab_wait_alive(pd, &w.done, tmo)) {
		spin_lock_irqsave(&pd->lock, flags);
		if (test_bit(slot, pd->slot_map) &&
		    pd->slots[slot].cid == cid && pd->slots[slot].waiter == &w) {
			/* slot stays busy until its CQE arrives or a reset */
			pd->slots[slot].waiter = NULL;
			abandoned = true;
		}
		spin_unlock_irqrestore(&pd->lock, flags);
		if (abandoned) {
			atomic64_inc(&pd->stats.timeouts);
			dev_warn(&pd->pdev->dev,
				 "command op %#x cid %#x region %u timed out after %u ms\n",
				 sqe->opcode, cid, le32_to_cpu(sqe->region),
				 timeout_ms);
			/* also detects a vanished device (ID reads ~0) */
			pinlab_dev_reset(pd, "command timeout");
			return -ETIMEDOUT;
		}
		/* completed (or failed) concurrently with the timeout */
		wait_for_completion(&w.done);
	}
	if (w.err)
		return w.err;
	*comp = w.comp;
	comp->epoch = w.epoch;
	if (comp->status)
		atomic64_inc(&pd->stats.cmd_errors);
	return 0;
}

/*
 * Send one command naming region @r and wait.  *status receives the raw
 * device status (or a pseudo status); the return value is the mapped
 * errno.  Commands other than CREATE_REGION are refused when the device
 * was reset since the region was created.
 */
int pinlab_submit_region(struct pinlab_region *r, struct pinlab_sqe *sqe,
			 struct pinlab_completion *comp, unsigned int timeout_ms,
			 u16 *status)
{
	bool create = sqe->opcode == PINLAB_OP_CREATE_REGION;
	int ret;

	memset(comp, 0, sizeof(*comp));
	if (!create) {
		ret = pinlab_dev_epoch_check(r->pd, r->epoch);
		if (ret)
			goto fail;
	}
	sqe->region = cpu_to_le32(r->id);
	ret = pinlab_submit(r->pd, sqe, comp, timeout_ms);
	if (ret)
		goto fail;
	if (!create && comp->epoch != r->epoch) {
		ret = -EIO;
		goto fail;
	}
	*status = comp->status;
	if (comp->status) {
		atomic_set(&r->last_status, comp->status);
		if (comp->status == PINLAB_STATUS_PAGE_FAULT)
			atomic64_inc(&r->faults);
	}
	return pinlab_status_to_errno(comp->status);

fail:
	*status = pinlab_errno_to_pseudo_status(ret);
	atomic_set(&r->last_status, *status);
	return ret;
}

/* MAP_PAGES for [first, first + count) from r->dma[]; map_lock held. */
int pinlab_map_pages(struct pinlab_region *r, unsigned long first,
		     unsigned long count)
{
	struct pinlab_completion comp;
	struct pinlab_sqe sqe;
	unsigned long i;
	u16 status;

	lockdep_assert_held(&r->map_lock);
	if (WARN_ON_ONCE(!count || count > PINLAB_MAP_CHUNK ||
			 first + count > r->npages))
		return -EINVAL;
	for (i = 0; i < count; i++)
		r->list[i] = cpu_to_le64(r->dma[first + i]);
	pinlab_sqe_init(&sqe, PINLAB_OP_MAP_PAGES);
	sqe.a[0] = cpu_to_le64(first);
	sqe.a[1] = cpu_to_le64(count);
	sqe.a[2] = cpu_to_le64(r->list_dma);
	return pinlab_submit_region(r, &sqe, &comp, pinlab_cmd_timeout_ms,
				    &status);
}

int pinlab_dev_fence(struct pinlab_dev *pd, struct pinlab_region_op *arg)
{
	struct pinlab_completion comp;
	struct pinlab_sqe sqe;
	int ret;

	if (arg->region || arg->pad)
		return -EINVAL;
	arg->status = PINLAB_STATUS_OK;
	arg->result = 0;
	pinlab_sqe_init(&sqe, PINLAB_OP_FENCE);
	ret = pinlab_submit(pd, &sqe, &comp, pinlab_cmd_timeout_ms);
	if (ret) {
		arg->status = pinlab_errno_to_pseudo_status(ret);
		return ret;
	}
	arg->status = comp.status;
	return pinlab_status_to_errno(comp.status);
}

irqreturn_t pinlab_cq_irq(int irq, void *data)
{
	struct pinlab_dev *pd = data;
	unsigned int n = 0;

	spin_lock(&pd->lock);
	if (pd->state != PINLAB_DEV_RUNNING) {
		spin_unlock(&pd->lock);
		return IRQ_HANDLED;
	}
	for (;;) {
		struct pinlab_cqe *c = &pd->cq[pd->cq_head];
		struct pinlab_waiter *w;
		unsigned int slot;
		u16 cid;

		if ((le32_to_cpu(READ_ONCE(c->flags)) & PINLAB_PHASE) !=
		    pd->cq_phase)
			break;
		/* read the entry only after seeing its phase bit */
		dma_rmb();
		cid = le16_to_cpu(c->cid);
		slot = cid & PINLAB_CID_SLOT_MASK;
		n++;
		if (slot >= PINLAB_NSLOTS || !test_bit(slot, pd->slot_map) ||
		    pd->slots[slot].cid != cid) {
			atomic64_inc(&pd->stats.spurious_cqes);
		} else {
			w = pd->slots[slot].waiter;
			pd->slots[slot].waiter = NULL;
			__clear_bit(slot, pd->slot_map);
			if (w) {
				w->comp.status = le16_to_cpu(c->status);
				w->comp.result0 = le64_to_cpu(c->result0);
				w->comp.result1 = le64_to_cpu(c->result1);
				complete(&w->done);
			}
		}
		if (++pd->cq_head == PINLAB_CQ_ENTRIES) {
			pd->cq_head = 0;
			pd->cq_phase ^= 1;
		}
	}
	if (n)
		writel(pd->cq_head, pd->bar0 + PINLAB_REG_CQ_HEAD);
	spin_unlock(&pd->lock);
	if (n)
		wake_up(&pd->slot_wq);
	return n ? IRQ_HANDLED : IRQ_NONE;
}

irqreturn_t pinlab_eq_irq(int irq, void *data)
{
	struct pinlab_dev *pd = data;
	unsigned int n = 0;

	spin_lock(&pd->eq_lock);
	for (;;) {
		struct pinlab_eqe *e = &pd->eq[pd->eq_head];
		struct pinlab_event ev;

		if ((le32_to_cpu(READ_ONCE(e->flags)) & PINLAB_PHASE) !=
		    pd->eq_phase)
			break;
		dma_rmb();
		ev.type = le16_to_cpu(e->type);
		ev.region = le32_to_cpu(e->region);
		ev.info0 = le64_to_cpu(e->info0);
		ev.info1 = le64_to_cpu(e->info1);
		n++;
		if (!kfifo_put(&pd->events, ev))
			atomic64_inc(&pd->stats.events_dropped);
		if (++pd->eq_head == PINLAB_EQ_ENTRIES) {
			pd->eq_head = 0;
			pd->eq_phase ^= 1;
		}
	}
	if (n)
		writel(pd->eq_head, pd->bar0 + PINLAB_REG_EQ_HEAD);
	spin_unlock(&pd->eq_lock);
	if (n) {
		atomic64_add(n, &pd->stats.events);
		queue_work(pd->wq, &pd->event_work);
	}
	return n ? IRQ_HANDLED : IRQ_NONE;
}

