// SPDX-License-Identifier: GPL-2.0
/*
 * pinlab: user range registration (pin / map / CREATE_REGION / MAP_PAGES),
 * DMA commands on regions, deregistration, and the event work that
 * dispatches device events to regions.  Calls down into pinlab_odp.c and
 * pinlab_queue.c only.
 */
#include <linux/dma-mapping.h>
#include <linux/mm.h>
#include <linux/overflow.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/hmm.h>

#include "pinlab.h"
#include "pinlab_compat.h"

/* Release pinned pages; @dirty after the device may have written them. */
static void pinlab_region_unpin(struct pinlab_region *r, bool dirty)
{
	unsigned long i;

	if (!r->pages)
		return;
	if (r->mode == PINLAB_MODE_GUP) {
		for (i = 0; i < r->npinned; i++) {
			if (dirty)
				set_page_dirty_lock(r->pages[i]);
			put_page(r->pages[i]);
		}
	} else if (dirty) {
		unpin_user_pages_dirty_lock(r->pages, r->npinned, true);
	} else {
		unpin_user_pages(r->pages, r->npinned);
	}
	atomic64_sub(r->npinned, &r->pd->stats.pins_held);
	pr_debug("%s: region %u released %lu pages (mode %u, dirty %d)\n",
		 r->pd->name, r->id, r->npinned, r->mode, dirty);
	r->npinned = 0;
	kvfree(r->pages);
	r->pages = NULL;
}

/*
 * Pin the whole range.  get_user_pages()/pin_user_pages() may return
 * fewer pages than asked: loop.  A refusal (e.g. -EFAULT for a writable
 * FOLL_LONGTERM pin of an ext4 MAP_SHARED mapping on 6.5+) is returned
 * unchanged after releasing what was pinned.  With PINLAB_REG_FAST the
 * *_fast() entry points are called instead, without mmap_lock (they take
 * it themselves when they fall back to the slow path); r->gup_path
 * records which entry point pinned the region.
 */
static int pinlab_region_pin(struct pinlab_region *r)
{
	unsigned int gup_flags = r->writable ? PINLAB_FOLL_WRITE : 0;
	bool fast = r->flags & PINLAB_REG_FAST;
	struct mm_struct *mm = current->mm;
	int ret = 0;

	if (r->mode == PINLAB_MODE_LONGTERM)
		gup_flags |= PINLAB_FOLL_LONGTERM;

	r->pages = kvcalloc(r->npages, sizeof(*r->pages), GFP_KERNEL);
	if (!r->pages)
		return -ENOMEM;

	r->gup_path = fast ? PINLAB_GUP_PATH_FAST : PINLAB_GUP_PATH_SLOW;
	if (!fast)
		mmap_read_lock(mm);
	while (r->npinned < r->npages) {
		unsigned long start = r->addr + (r->npinned << PAGE_SHIFT);
		unsigned long nr = r->npages - r->npinned;
		struct page **pages = r->pages + r->npinned;
		long got;

		if (fast && r->mode == PINLAB_MODE_GUP)
			got = pinlab_get_user_pages_fast(start, nr, gup_flags,
							 pages);
		else if (fast)
			got = pinlab_pin_user_pages_fast(start, nr, gup_flags,
							 pages);
		else if (r->mode == PINLAB_MODE_GUP)
			got = pinlab_get_user_pages(start, nr, gup_flags, pages);
		else
			got = pinlab_pin_user_pages(start, nr, gup_flags, pages);
		if (got <= 0) {
			ret = got ? (int)got : -EFAULT;
			break;
		}
		r->npinned += got;
	}
	if (!fast)
		mmap_read_unlock(mm);
	atomic64_add(r->npinned, &r->pd->stats.pins_held);

	if (ret) {
		pr_debug("%s: pin mode %u flags %#x path %u failed at page %lu/%lu: %d\n",
			 r->pd->name, r->mode, gup_flags, r->gup_path,
			 r->npinned, r->npages, ret);
		pinlab_region_unpin(r, false);
	}
	return ret;
}

static int pinlab_region_dma_map_pinned(struct pinlab_region *r)
{
	struct device *dev = &r->pd->pdev->dev;
	unsigned long i;

	lockdep_assert_held(&r->map_lock);
	for (i = 0; i < r->npages; i++) {
		dma_addr_t dma = dma_map_page(dev, r->pages[i], 0, PAGE_SIZE,
					      pinlab_region_dir(r));

		if (dma_mapping_error(dev, dma))
			return -ENOMEM;	/* caller unmaps what was mapped */
		r->dma[i] = dma;
		__set_bit(i, r->mapped);
		r->nmapped++;
	}
	return 0;
}

static struct pinlab_region *pinlab_region_lookup(struct pinlab_dev *pd,
						  struct pinlab_file *pf,
						  u32 id)
{
	struct pinlab_region *r;

	xa_lock(&pd->regions);
	r = xa_load(&pd->regions, id);
	if (r && ((pf && r->owner != pf) || !kref_get_unless_zero(&r->ref)))
		r = NULL;
	xa_unlock(&pd->regions);
	return r;
}

static void pinlab_region_free(struct kref *kref)
{
	struct pinlab_region *r = container_of(kref, struct pinlab_region, ref);

	if (r->mm)
		mmdrop(r->mm);
	kfree(r);
}

void pinlab_region_put(struct pinlab_region *r)
{
	kref_put(&r->ref, pinlab_region_free);
}

/*
 * Make sure the device never touches the region again, then release the
 * local mappings and pins.  Idempotent; returns the DESTROY_REGION status.
 */
static u16 pinlab_region_teardown(struct pinlab_region *r)
{
	struct pinlab_dev *pd = r->pd;
	struct pinlab_completion comp;
	struct pinlab_sqe sqe;
	u16 status = PINLAB_STATUS_OK;
	int ret;

	down_write(&r->lock);
	if (r->state == PINLAB_REGION_GONE) {
		up_write(&r->lock);
		return status;
	}
	r->state = PINLAB_REGION_GONE;

	mutex_lock(&r->map_lock);
	if (r->dev_created) {
		pinlab_sqe_init(&sqe, PINLAB_OP_DESTROY_REGION);
		ret = pinlab_submit_region(r, &sqe, &comp, pinlab_cmd_timeout_ms,
					 &status);
		/*
		 * -ETIMEDOUT already reset the device; -ECANCELED/-EIO/-ENODEV
		 * mean the device dropped the region or is gone.  Any other
		 * refusal leaves the device state unknown: reset so DMA into
		 * these pages provably stops before they are released.
		 */
		if (ret && ret != -ETIMEDOUT && ret != -ECANCELED &&
		    ret != -EIO && ret != -ENODEV && ret != -ENOENT) {
			atomic64_inc(&pd->stats.escalations);
			pinlab_dev_reset(pd, "DESTROY_REGION refused");
		}
		r->dev_created = false;
	}
	r->dev_live = false;
	if (r->mapped)
		pinlab_unmap_range(r, 0, r->npages);
	mutex_unlock(&r->map_lock);

	/* no map_lock here: removal waits for running invalidations */
	if (r->mode == PINLAB_MODE_ODP)
		pinlab_odp_fini(r);
	else
		pinlab_region_unpin(r, r->writable && r->dev_used);

	if (r->list)
		dma_free_coherent(&pd->pdev->dev, PAGE_SIZE, r->list,
				  r->list_dma);
	r->list = NULL;
	kvfree(r->mapped);
	r->mapped = NULL;
	kvfree(r->dma);
	r->dma = NULL;
	if (r->id)
		ida_free(&pd->region_ida, r->id);
	pr_debug("%s: region %u torn down (destroy status %u)\n", pd->name,
		 r->id, status);
	r->id = 0;
	up_write(&r->lock);
	return status;
}

static int pinlab_register_validate(const struct pinlab_register *arg)
{
	u64 end;

	if (arg->pad)
		return -EINVAL;
	if (arg->mode > PINLAB_MODE_ODP)
		return -EINVAL;
	if (arg->flags & ~PINLAB_REG_FLAGS_ALL)
		return -EINVAL;
	/* odp pins nothing: there is no fast path to choose */
	if ((arg->flags & PINLAB_REG_FAST) && arg->mode == PINLAB_MODE_ODP)
		return -EINVAL;
	if (!arg->len || arg->len > PINLAB_MAX_REGION_BYTES)
		return -EINVAL;
	if (!PAGE_ALIGNED(arg->addr) || !PAGE_ALIGNED(arg->len))
		return -EINVAL;
	if (check_add_overflow(arg->addr, arg->len, &end))
		return -EINVAL;
	if (!access_ok(u64_to_user_ptr(arg->addr), arg->len))
		return -EFAULT;
	return 0;
}

int pinlab_region_register(struct pinlab_file *pf, struct pinlab_register *arg)
{
	struct pinlab_dev *pd = pf->pd;
	struct pinlab_completion comp;
	struct pinlab_region *r;
	struct pinlab_sqe sqe;
	unsigned long first;
	u16 status = PINLAB_STATUS_OK;
	int ret;

	BUILD_BUG_ON(PAGE_SIZE != 4096);
	BUILD_BUG_ON(PINLAB_MAX_REGION_BYTES / 4096 != PINLAB_MAX_PAGES);

	ret = pinlab_register_validate(arg);
	if (ret)
		return ret;
	arg->region = 0;
	arg->status = PINLAB_STATUS_OK;

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	kref_init(&r->ref);
	init_rwsem(&r->lock);
	mutex_init(&r->map_lock);
	r->pd = pd;
	r->owner = pf;
	r->mode = arg->mode;
	r->flags = arg->flags;
	r->writable = !(arg->flags & PINLAB_REG_READONLY);
	r->addr = arg->addr;
	r->len = arg->len;
	r->npages = arg->len >> PAGE_SHIFT;
	r->state = PINLAB_REGION_ACTIVE;
	atomic64_set(&r->invalidations, 0);
	atomic64_set(&r->faults, 0);
	atomic_set(&r->last_status, 0);

	ret = -ENOMEM;
	r->dma = kvcalloc(r->npages, sizeof(*r->dma), GFP_KERNEL);
	if (!r->dma)
		goto err_teardown;
	r->mapped = kvcalloc(BITS_TO_LONGS(r->npages), sizeof(long),
			     GFP_KERNEL);
	if (!r->mapped)
		goto err_teardown;
	r->list = dma_alloc_coherent(&pd->pdev->dev, PAGE_SIZE, &r->list_dma,
				     GFP_KERNEL);
	if (!r->list)
		goto err_teardown;

	ret = ida_alloc_range(&pd->region_ida, 1, PINLAB_MAX_REGION_ID,
			      GFP_KERNEL);
	if (ret < 0)
		goto err_teardown;
	r->id = ret;

	if (r->mode == PINLAB_MODE_ODP) {
		ret = pinlab_odp_init(r);
		if (ret)
			goto err_teardown;
	} else {
		ret = pinlab_region_pin(r);
		if (ret)
			goto err_teardown;
		mutex_lock(&r->map_lock);
		ret = pinlab_region_dma_map_pinned(r);
		mutex_unlock(&r->map_lock);
		if (ret)
			goto err_teardown;
	}

	pinlab_sqe_init(&sqe, PINLAB_OP_CREATE_REGION);
	sqe.a[0] = cpu_to_le64(r->npages);
	sqe.a[1] = cpu_to_le64(r->writable ? PINLAB_REGION_WRITABLE : 0);
	mutex_lock(&r->map_lock);
	ret = pinlab_submit_region(r, &sqe, &comp,
					   pinlab_cmd_timeout_ms, &status);
	if (!ret) {
		r->epoch = comp.epoch;
		r->dev_created = true;
		r->dev_used = true;
		r->dev_live = true;
	}
	if (!ret && r->mode != PINLAB_MODE_ODP) {
		for (first = 0; first < r->npages; first += PINLAB_MAP_CHUNK) {
			ret = pinlab_map_pages(r, first,
						      min_t(unsigned long,
							    PINLAB_MAP_CHUNK,
							    r->npages - first));
			if (ret) {
				status = (u16)atomic_read(&r->last_status);
				break;
			}
		}
	}
	mutex_unlock(&r->map_lock);
	if (ret)
		goto err_teardown;

	if (r->mode == PINLAB_MODE_ODP) {
		/* prefault the whole range; later faults come from the EQ */
		ret = pinlab_odp_map_range(r, 0, r->npages);
		if (ret) {
			status = (u16)atomic_read(&r->last_status);
			goto err_teardown;
		}
	}

	ret = xa_insert(&pd->regions, r->id, r, GFP_KERNEL);
	if (ret)
		goto err_teardown;

	arg->region = r->id;
	arg->status = PINLAB_STATUS_OK;
	pr_debug("%s: region %u registered: addr %#lx pages %lu mode %u flags %#x\n",
		 pd->name, r->id, r->addr, r->npages, r->mode, r->flags);
	return 0;

err_teardown:
	arg->status = status;
	pinlab_region_teardown(r);
	pinlab_region_put(r);
	return ret;
}

int pinlab_region_deregister(struct pinlab_file *pf, struct pinlab_region_op *arg)
{
	struct pinlab_dev *pd = pf->pd;
	struct pinlab_region *r;

	if (arg->pad)
		return -EINVAL;
	arg->status = PINLAB_STATUS_OK;
	arg->result = 0;

	xa_lock(&pd->regions);
	r = xa_load(&pd->regions, arg->region);
	if (r && r->owner == pf)
		__xa_erase(&pd->regions, arg->region);
	else
		r = NULL;
	xa_unlock(&pd->regions);
	if (!r)
		return -ENOENT;

	arg->status = pinlab_region_teardown(r);
	pinlab_region_put(r);
	return 0;
}

void pinlab_region_release_all(struct pinlab_file *pf)
{
	struct pinlab_dev *pd = pf->pd;
	struct pinlab_region *r, *entry;
	unsigned long id;

	for (;;) {
		r = NULL;
		xa_lock(&pd->regions);
		xa_for_each(&pd->regions, id, entry) {
			if (entry->owner == pf) {
				r = entry;
				__xa_erase(&pd->regions, id);
				break;
			}
		}
		xa_unlock(&pd->regions);
		if (!r)
			break;
		pinlab_region_teardown(r);
		pinlab_region_put(r);
	}
}

/*
 * Look up @id for a command; on success the region is read-locked and
 * active, and the caller must call pinlab_region_unlock_put().
 */
static struct pinlab_region *pinlab_region_get_active(struct pinlab_file *pf,
						      u32 id, int *err)
{
	struct pinlab_region *r = pinlab_region_lookup(pf->pd, pf, id);

	*err = -ENOENT;
	if (!r)
		return NULL;
	down_read(&r->lock);
	if (r->state != PINLAB_REGION_ACTIVE) {
		up_read(&r->lock);
		pinlab_region_put(r);
		return NULL;
	}
	*err = 0;
	return r;
}

static void pinlab_region_unlock_put(struct pinlab_region *r)
{
	up_read(&r->lock);
	pinlab_region_put(r);
}

static int pinlab_check_range(struct pinlab_region *r, u64 offset, u64 len)
{
	u64 end;

	if (!len || check_add_overflow(offset, len, &end) || end > r->len)
		return -EINVAL;
	return 0;
}

int pinlab_region_dma(struct pinlab_file *pf, struct pinlab_dma *arg, bool write)
{
	struct pinlab_completion comp;
	struct pinlab_region *r;
	struct pinlab_sqe sqe;
	unsigned int retries = 0, max_retries;
	u16 status = PINLAB_STATUS_OK;
	int ret;

	if (arg->pad)
		return -EINVAL;
	arg->bytes = 0;
	arg->crc32 = 0;
	arg->status = PINLAB_STATUS_OK;
	if (write) {
		if (!arg->generation || arg->generation > 0xffff ||
		    (arg->offset & 7) || (arg->len & 7))
			return -EINVAL;
	} else if (arg->generation) {
		return -EINVAL;
	}

	r = pinlab_region_get_active(pf, arg->region, &ret);
	if (!r)
		return ret;
	ret = pinlab_check_range(r, arg->offset, arg->len);
	if (ret)
		goto out;
	if (write && !r->writable) {
		ret = -EPERM;
		goto out;
	}
	max_retries = 8 + (arg->len >> PAGE_SHIFT) / PINLAB_MAP_CHUNK;

again:
	pinlab_sqe_init(&sqe, write ? PINLAB_OP_DMA_WRITE : PINLAB_OP_DMA_READ);
	sqe.a[0] = cpu_to_le64(arg->offset);
	sqe.a[1] = cpu_to_le64(arg->len);
	sqe.a[2] = cpu_to_le64(arg->generation);
	ret = pinlab_submit_region(r, &sqe, &comp,
					   pinlab_cmd_timeout_ms, &status);
	if (ret == -EFAULT && status == PINLAB_STATUS_PAGE_FAULT &&
	    r->mode == PINLAB_MODE_ODP && retries++ < max_retries &&
	    comp.result0 < r->npages) {
		unsigned long last = (arg->offset + arg->len - 1) >> PAGE_SHIFT;
		unsigned long idx = comp.result0;

		if (idx <= last &&
		    !pinlab_odp_map_range(r, idx,
					  min_t(unsigned long, PINLAB_MAP_CHUNK,
						last + 1 - idx)))
			goto again;
	}
	arg->status = status;
	if (status != PINLAB_STATUS_OK) {
		/* PAGE_FAULT: page index, DMA_ERROR: guest-physical address */
		arg->bytes = comp.result0;
	} else if (write) {
		arg->bytes = comp.result0;
	} else {
		arg->crc32 = (u32)comp.result0;
		arg->bytes = comp.result1;
	}
out:
	pinlab_region_unlock_put(r);
	return ret;
}

int pinlab_region_stream_start(struct pinlab_file *pf, struct pinlab_stream *arg)
{
	struct pinlab_completion comp;
	struct pinlab_region *r;
	struct pinlab_sqe sqe;
	u16 status = PINLAB_STATUS_OK;
	int ret;

	if (arg->pad[0] || arg->pad[1] || arg->pad[2])
		return -EINVAL;
	arg->status = PINLAB_STATUS_OK;
	if (!arg->generation || arg->generation > 0xffff ||
	    (arg->offset & 7) || (arg->len & 7) || (arg->chunk & 7))
		return -EINVAL;

	r = pinlab_region_get_active(pf, arg->region, &ret);
	if (!r)
		return ret;
	ret = pinlab_check_range(r, arg->offset, arg->len);
	if (ret)
		goto out;
	if (!r->writable) {
		ret = -EPERM;
		goto out;
	}
	pinlab_sqe_init(&sqe, PINLAB_OP_STREAM_START);
	sqe.a[0] = cpu_to_le64(arg->offset);
	sqe.a[1] = cpu_to_le64(arg->len);
	sqe.a[2] = cpu_to_le64(arg->generation);
	sqe.a[3] = cpu_to_le64(arg->chunk);
	sqe.a[4] = cpu_to_le64(arg->interval_us);
	ret = pinlab_submit_region(r, &sqe, &comp,
					   pinlab_cmd_timeout_ms, &status);
	arg->status = status;
	if (!ret)
		pr_debug("%s: region %u stream started\n", pf->pd->name, r->id);
out:
	pinlab_region_unlock_put(r);
	return ret;
}

int pinlab_region_stream_stop(struct pinlab_file *pf, struct pinlab_region_op *arg)
{
	struct pinlab_completion comp;
	struct pinlab_region *r;
	struct pinlab_sqe sqe;
	u16 status = PINLAB_STATUS_OK;
	int ret;

	if (arg->pad)
		return -EINVAL;
	arg->status = PINLAB_STATUS_OK;
	arg->result = 0;
	r = pinlab_region_get_active(pf, arg->region, &ret);
	if (!r)
		return ret;
	pinlab_sqe_init(&sqe, PINLAB_OP_STREAM_STOP);
	ret = pinlab_submit_region(r, &sqe, &comp,
					   pinlab_cmd_timeout_ms, &status);
	arg->status = status;
	arg->result = comp.result0;
	if (!ret)
		pr_debug("%s: region %u stream stopped after %llu chunks\n",
			 pf->pd->name, r->id, comp.result0);
	pinlab_region_unlock_put(r);
	return ret;
}

int pinlab_region_query(struct pinlab_file *pf, struct pinlab_query *arg)
{
	struct pinlab_region *r;
	unsigned long i, n = 0;
	u32 region = arg->region;
	int ret;

	r = pinlab_region_get_active(pf, region, &ret);
	if (!r)
		return ret;
	memset(arg, 0, sizeof(*arg));
	arg->region = region;
	arg->mode = r->mode;
	arg->flags = r->flags;
	arg->state = pinlab_dev_epoch_check(r->pd, r->epoch) ?
		     PINLAB_STATE_FAILED : PINLAB_STATE_ACTIVE;
	arg->addr = r->addr;
	arg->len = r->len;
	arg->pages = r->npages;
	if (r->mode == PINLAB_MODE_ODP) {
		mutex_lock(&r->map_lock);
		arg->pinned = r->nmapped;
		for_each_set_bit(i, r->mapped, r->npages)
			n += pinlab_page_maybe_dma_pinned(hmm_pfn_to_page(r->pfns[i]));
		mutex_unlock(&r->map_lock);
	} else {
		/* pages[] is stable while the region lock is held */
		arg->pinned = r->npinned;
		for (i = 0; i < r->npinned; i++)
			n += pinlab_page_maybe_dma_pinned(r->pages[i]);
	}
	arg->maybe_dma_pinned = n;
	arg->invalidations = atomic64_read(&r->invalidations);
	arg->faults = atomic64_read(&r->faults);
	arg->last_status = (u16)atomic_read(&r->last_status);
	arg->gup_path = r->gup_path;
	pinlab_region_unlock_put(r);
	return 0;
}

int pinlab_region_dirty(struct pinlab_file *pf, struct pinlab_region_op *arg)
{
	struct pinlab_region *r;
	unsigned long i;
	int ret;

	if (arg->pad)
		return -EINVAL;
	arg->status = PINLAB_STATUS_OK;
	arg->result = 0;
	r = pinlab_region_get_active(pf, arg->region, &ret);
	if (!r)
		return ret;
	if (r->mode == PINLAB_MODE_ODP) {
		/* pages are dirtied on invalidation/teardown instead */
		ret = -EOPNOTSUPP;
	} else if (!r->writable) {
		ret = -EPERM;
	} else {
		/* pages[] is stable while the region lock is held */
		for (i = 0; i < r->npinned; i++)
			set_page_dirty_lock(r->pages[i]);
		arg->result = r->npinned;
	}
	pinlab_region_unlock_put(r);
	return ret;
}

/* Called from the per-device event work for every EQ entry. */
static void pinlab_region_handle_event(struct pinlab_dev *pd,
				       const struct pinlab_event *ev)
{
	struct pinlab_region *r;

	switch (ev->type) {
	case PINLAB_EV_PAGE_FAULT:
		r = pinlab_region_lookup(pd, NULL, ev->region);
		if (!r) {
			pr_debug("%s: fault event for unknown region %u\n",
				 pd->name, ev->region);
			return;
		}
		atomic64_inc(&r->faults);
		down_read(&r->lock);
		if (r->state == PINLAB_REGION_ACTIVE &&
		    r->mode == PINLAB_MODE_ODP && ev->info0 < r->npages) {
			unsigned long idx = ev->info0;
			int ret;

			ret = pinlab_odp_map_range(r, idx,
						   min_t(unsigned long,
							 PINLAB_MAP_CHUNK,
							 r->npages - idx));
			if (!ret)
				atomic64_inc(&pd->stats.odp_faults_served);
			pr_debug("%s: region %u fault at page %lu served: %d\n",
				 pd->name, r->id, idx, ret);
		}
		pinlab_region_unlock_put(r);
		break;
	case PINLAB_EV_STREAM_STOPPED:
		r = pinlab_region_lookup(pd, NULL, ev->region);
		pr_debug("%s: region %u stream stopped, status %llu\n",
			 pd->name, ev->region, ev->info0);
		if (!r)
			return;
		if (ev->info0)
			atomic_set(&r->last_status, (u16)ev->info0);
		pinlab_region_put(r);
		break;
	case PINLAB_EV_DEVICE_ERROR:
		dev_err_ratelimited(&pd->pdev->dev,
				    "device error event: region %u info %#llx/%#llx\n",
				    ev->region, ev->info0, ev->info1);
		break;
	default:
		dev_warn_ratelimited(&pd->pdev->dev, "unknown event type %u\n",
				     ev->type);
		break;
	}
}

/*
 * pd->event_work, queued by the EQ IRQ (pinlab_queue.c).  Single consumer
 * of pd->events (a work item never runs concurrently with itself);
 * process context, no lock held on entry.
 */
void pinlab_event_work(struct work_struct *work)
{
	struct pinlab_dev *pd = container_of(work, struct pinlab_dev,
					     event_work);
	struct pinlab_event ev;

	while (kfifo_get(&pd->events, &ev))
		pinlab_region_handle_event(pd, &ev);
}
