// SPDX-License-Identifier: GPL-2.0
/*
 * pinlab: the device's mappings of a region's pages (dma_unmap for every
 * mode; MAP_PAGES itself is in pinlab_queue.c), and on-demand-paging
 * regions (no pin).  An mmu_interval_notifier covers the range; pages are
 * resolved with hmm_range_fault() and mapped with MAP_PAGES; an
 * invalidation sends INVALIDATE and waits for its completion (the
 * device's fence) before returning.  Pattern of
 * lib/test_hmm.c (dmirror_interval_invalidate / dmirror_range_fault) and
 * drivers/infiniband/core/umem_odp.c.  Calls down into pinlab_queue.c
 * only; the notifier ops are the kernel's callback into this file.
 */
#include <linux/dma-mapping.h>
#include <linux/hmm.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>

#include "pinlab.h"

/* revoke latency histogram: bucket i counts fences that took < 2^i us */
static void pinlab_revoke_account(struct pinlab_dev *pd, s64 us)
{
	struct pinlab_stats *s = &pd->stats;
	unsigned int b = us > 0 ? fls64(us) : 0;
	s64 max = atomic64_read(&s->revoke_max_us);

	if (b >= PINLAB_LAT_BUCKETS)
		b = PINLAB_LAT_BUCKETS - 1;
	atomic64_inc(&s->revokes);
	atomic64_inc(&s->revoke_lat[b]);
	while (us > max) {
		s64 old = atomic64_cmpxchg(&s->revoke_max_us, max, us);

		if (old == max)
			break;
		max = old;
	}
}

/* dma_unmap every mapped page in [first, first + count); map_lock held. */
void pinlab_unmap_range(struct pinlab_region *r, unsigned long first,
			unsigned long count)
{
	struct device *dev = &r->pd->pdev->dev;
	unsigned long i;

	lockdep_assert_held(&r->map_lock);
	for (i = find_next_bit(r->mapped, first + count, first);
	     i < first + count;
	     i = find_next_bit(r->mapped, first + count, i + 1)) {
		dma_unmap_page(dev, r->dma[i], PAGE_SIZE, pinlab_region_dir(r));
		__clear_bit(i, r->mapped);
		r->nmapped--;
		if (r->mode == PINLAB_MODE_ODP) {
			/*
			 * No reference is held: the page is still mapped by
			 * the process because every PTE change invalidates
			 * us first.  Like umem_odp, dirty without the page
			 * lock (the caller may hold it).
			 */
			if (r->writable)
				folio_mark_dirty(page_folio(hmm_pfn_to_page(r->pfns[i])));
			r->pfns[i] = 0;
			atomic64_dec(&r->pd->stats.odp_mapped);
		}
	}
}

static int pinlab_odp_fence(struct pinlab_region *r, unsigned long first,
			    unsigned long count)
{
	struct pinlab_dev *pd = r->pd;
	struct pinlab_completion comp;
	struct pinlab_sqe sqe;
	ktime_t t0;
	int ret;

	ret = pinlab_dev_epoch_check(pd, r->epoch);
	if (ret)
		return ret;	/* reset or gone: the device dropped the region */

	pinlab_sqe_init(&sqe, PINLAB_OP_INVALIDATE);
	sqe.region = cpu_to_le32(r->id);
	sqe.a[0] = cpu_to_le64(first);
	sqe.a[1] = cpu_to_le64(count);
	t0 = ktime_get();
	ret = pinlab_submit(pd, &sqe, &comp, pinlab_fence_timeout_ms);
	if (!ret && comp.status == PINLAB_STATUS_OK)
		pinlab_revoke_account(pd, ktime_us_delta(ktime_get(), t0));
	if (ret == -ETIMEDOUT) {
		/*
		 * No slot or no completion in time: pinlab_submit() reset
		 * the function before returning, so DMA has stopped.
		 */
		atomic64_inc(&pd->stats.escalations);
		atomic_set(&r->last_status, PINLAB_STATUS_TIMEOUT);
		dev_warn(&pd->pdev->dev,
			 "region %u: INVALIDATE fence missed (%u ms), device reset\n",
			 r->id, pinlab_fence_timeout_ms);
		return ret;
	}
	if (ret)
		return ret;
	if (comp.status != PINLAB_STATUS_OK) {
		atomic_set(&r->last_status, comp.status);
		if (comp.status != PINLAB_STATUS_NO_REGION) {
			/* no fence: make DMA provably stop */
			atomic64_inc(&pd->stats.escalations);
			pinlab_dev_reset(pd, "INVALIDATE refused");
		}
		return pinlab_status_to_errno(comp.status);
	}
	return 0;
}

static bool pinlab_odp_invalidate(struct mmu_interval_notifier *mni,
				  const struct mmu_notifier_range *range,
				  unsigned long cur_seq)
{
	struct pinlab_region *r = container_of(mni, struct pinlab_region,
					       notifier);
	struct pinlab_dev *pd = r->pd;
	unsigned long start = max(range->start, r->addr);
	unsigned long end = min(range->end, r->addr + r->len);
	bool blockable = mmu_notifier_range_blockable(range);
	unsigned long first, count;
	unsigned int ev;
	int ret;

	if (blockable)
		mutex_lock(&r->map_lock);
	else if (!mutex_trylock(&r->map_lock))
		goto refuse;

	mmu_interval_set_seq(mni, cur_seq);
	if (start >= end || !r->mapped)
		goto out;
	first = (start - r->addr) >> PAGE_SHIFT;
	count = ((end - r->addr + PAGE_SIZE - 1) >> PAGE_SHIFT) - first;
	if (find_next_bit(r->mapped, first + count, first) >= first + count)
		goto out;	/* nothing of ours in the range */

	if (!blockable) {
		if (r->dev_live && !pinlab_dev_epoch_gone(pd, r->epoch)) {
			/* the device may use these pages: the fence sleeps */
			mutex_unlock(&r->map_lock);
			goto refuse;
		}
		/* reset or halted since: nothing to fence, no sleep needed */
		r->dev_live = false;
	}

	ev = min_t(unsigned int, range->event, PINLAB_NR_EVENTS_STATS - 1);
	atomic64_inc(&r->invalidations);
	atomic64_inc(&pd->stats.invalidations[ev]);
	if (r->dev_live) {
		ret = pinlab_odp_fence(r, first, count);
		if (ret)
			r->dev_live = false;	/* region failed on the device */
		pr_debug("%s: region %u invalidate [%lu,+%lu) event %d: %d\n",
			 pd->name, r->id, first, count, range->event, ret);
	}
	pinlab_unmap_range(r, first, count);
out:
	mutex_unlock(&r->map_lock);
	return true;

refuse:
	atomic64_inc(&pd->stats.invalidations_nonblock_refused);
	return false;
}

static const struct mmu_interval_notifier_ops pinlab_odp_ops = {
	.invalidate = pinlab_odp_invalidate,
};

int pinlab_odp_init(struct pinlab_region *r)
{
	int ret;

	r->pfns = kvcalloc(r->npages, sizeof(*r->pfns), GFP_KERNEL);
	if (!r->pfns)
		return -ENOMEM;
	r->mm = current->mm;
	mmgrab(r->mm);	/* dropped when the region is freed */
	ret = mmu_interval_notifier_insert(&r->notifier, r->mm, r->addr,
					   r->len, &pinlab_odp_ops);
	if (ret)
		return ret;	/* pfns freed by pinlab_odp_fini() */
	r->notifier_inserted = true;
	return 0;
}

/* Teardown; the device no longer uses the region, map_lock not held. */
void pinlab_odp_fini(struct pinlab_region *r)
{
	if (r->notifier_inserted)
		mmu_interval_notifier_remove(&r->notifier);
	r->notifier_inserted = false;
	kvfree(r->pfns);
	r->pfns = NULL;
}

static int pinlab_odp_map_chunk(struct pinlab_region *r, unsigned long first,
				unsigned long n, unsigned long *pfns)
{
	struct device *dev = &r->pd->pdev->dev;
	unsigned long timeout = jiffies +
				msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT);
	struct hmm_range range = {
		.notifier = &r->notifier,
		.start = r->addr + (first << PAGE_SHIFT),
		.end = r->addr + ((first + n) << PAGE_SHIFT),
		.hmm_pfns = pfns,
		.default_flags = HMM_PFN_REQ_FAULT |
				 (r->writable ? HMM_PFN_REQ_WRITE : 0),
	};
	struct mm_struct *mm = r->mm;
	unsigned long i;
	int ret;

again:
	if (time_after(jiffies, timeout))
		return -EBUSY;
	range.notifier_seq = mmu_interval_read_begin(&r->notifier);
	mmap_read_lock(mm);
	ret = hmm_range_fault(&range);
	mmap_read_unlock(mm);
	if (ret) {
		if (ret == -EBUSY)
			goto again;
		return ret;
	}

	mutex_lock(&r->map_lock);
	if (mmu_interval_read_retry(&r->notifier, range.notifier_seq)) {
		mutex_unlock(&r->map_lock);
		goto again;
	}
	if (!r->dev_live || pinlab_dev_epoch_check(r->pd, r->epoch)) {
		ret = -EIO;
		goto out;
	}
	for (i = 0; i < n; i++) {
		unsigned long idx = first + i;
		struct page *page = hmm_pfn_to_page(pfns[i]);
		dma_addr_t dma;

		if (test_bit(idx, r->mapped)) {
			/* still valid: any PTE change would have unmapped it */
			if (hmm_pfn_to_page(r->pfns[idx]) == page)
				continue;
			pinlab_unmap_range(r, idx, 1);
		}
		dma = dma_map_page(dev, page, 0, PAGE_SIZE,
				   pinlab_region_dir(r));
		if (dma_mapping_error(dev, dma)) {
			ret = -ENOMEM;
			goto out;
		}
		r->dma[idx] = dma;
		r->pfns[idx] = pfns[i];
		__set_bit(idx, r->mapped);
		r->nmapped++;
		atomic64_inc(&r->pd->stats.odp_mapped);
	}
	ret = pinlab_map_pages(r, first, n);
out:
	mutex_unlock(&r->map_lock);
	return ret;
}

/*
 * Resolve [first, first + count) with hmm_range_fault() and map it on the
 * device.  Callable from the ioctl path and from the event work (no mm
 * of our own there: r->mm is used).  Does not hold a page reference.
 */
int pinlab_odp_map_range(struct pinlab_region *r, unsigned long first,
			 unsigned long count)
{
	unsigned long *pfns;
	unsigned long done = 0;
	int ret = 0;

	if (!count || first >= r->npages || count > r->npages - first)
		return -EINVAL;
	/* allocate outside map_lock: reclaim may invalidate us */
	pfns = kmalloc_array(PINLAB_MAP_CHUNK, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	if (!mmget_not_zero(r->mm)) {
		kfree(pfns);
		return -EFAULT;
	}
	while (done < count) {
		unsigned long n = min_t(unsigned long, PINLAB_MAP_CHUNK,
					count - done);

		memset(pfns, 0, n * sizeof(*pfns));
		ret = pinlab_odp_map_chunk(r, first + done, n, pfns);
		if (ret)
			break;
		done += n;
	}
	mmput(r->mm);
	kfree(pfns);
	return ret;
}
