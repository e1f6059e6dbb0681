// flowstore console: live timelines over the WebSocket and operations with progress.
// Hand-written, no dependencies, no build step. Pages work without it (forms post and reload).
(function () {
  "use strict";

  var ui = document.body.getAttribute("data-ui") || "/ui";
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function say(element, text) {
    if (element) element.textContent = text;
  }

  function signedOut(status) {
    var link = document.createElement("a");
    link.href = ui + "/login?next=" + encodeURIComponent(location.pathname + location.search);
    link.textContent = "Sign in again";
    say(status, "Your session has ended. ");
    if (status) status.appendChild(link);
  }

  // Users: one card per flow; a push names the flow and the log position of the change, and the
  // card is fetched again once the projections have reached that position.
  function watchUser(root) {
    var user = root.getAttribute("data-live-user");
    var status = document.getElementById("live-status");
    var cards = document.getElementById("cards");
    var wanted = {}; // flowId -> newest pushed position
    var busy = {}; // flowId -> a fetch is under way
    var retries = 0;
    var opened = false;

    function cardFor(flowId) {
      var all = cards.querySelectorAll("section.card");
      for (var i = 0; i < all.length; i++) {
        if (all[i].getAttribute("data-flow") === flowId) return all[i];
      }
      return null;
    }

    function refresh(flowId, attempt) {
      if (busy[flowId]) return;
      busy[flowId] = true;
      var url = ui + "/users/" + encodeURIComponent(user) + "/flows/" + encodeURIComponent(flowId);
      fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (response.status === 401 || response.status === 403) {
            signedOut(status);
            throw new Error("signed out");
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          var projected = Number(response.headers.get("X-Projection-Position") || "0");
          return response.text().then(function (html) {
            return { html: html, projected: projected };
          });
        })
        .then(function (result) {
          busy[flowId] = false;
          if (result.projected < (wanted[flowId] || 0) && attempt < 40) {
            // Written by another process whose projector has not committed yet: ask again soon.
            window.setTimeout(function () { refresh(flowId, attempt + 1); }, Math.min(50 * (attempt + 1), 500));
            return;
          }
          var holder = document.createElement("div");
          holder.innerHTML = result.html.trim();
          var fresh = holder.firstElementChild;
          var old = cardFor(flowId);
          if (old) {
            old.replaceWith(fresh);
          } else {
            var empty = document.getElementById("no-flows");
            if (empty) empty.remove();
            cards.insertBefore(fresh, cards.firstChild);
          }
          fresh.classList.add("updated");
          say(status, "Live. Updated the history of " + flowId + " at " + new Date().toLocaleTimeString() + ".");
        })
        .catch(function (error) {
          busy[flowId] = false;
          if (String(error.message) !== "signed out") {
            say(status, "Could not update " + flowId + " (" + error.message + "); retrying.");
            window.setTimeout(function () { refresh(flowId, attempt + 1); }, 1000);
          }
        });
    }

    function connect() {
      var scheme = location.protocol === "https:" ? "wss://" : "ws://";
      var socket = new WebSocket(scheme + location.host + ui + "/ws?user=" + encodeURIComponent(user));
      socket.addEventListener("message", function (event) {
        var message;
        try { message = JSON.parse(event.data); } catch (e) { return; }
        if (message.type === "watching") {
          retries = 0;
          say(status, "Live: this page updates when " + user + "'s flows change.");
          root.setAttribute("data-live", "on");
          if (opened) {
            // Reconnected: changes may have been missed meanwhile.
            var all = cards.querySelectorAll("section.card");
            for (var i = 0; i < all.length; i++) refresh(all[i].getAttribute("data-flow"), 0);
          }
          opened = true;
        } else if (message.type === "flow-state-updated") {
          wanted[message.flowId] = Math.max(wanted[message.flowId] || 0, message.position || 0);
          refresh(message.flowId, 0);
        }
      });
      socket.addEventListener("close", function (event) {
        root.setAttribute("data-live", "off");
        if (event.code === 4401 || event.code === 4403) {
          signedOut(status);
          return;
        }
        retries += 1;
        var delay = Math.min(1000 * Math.pow(2, retries - 1), 15000);
        say(status, "Live updates interrupted; reconnecting in " + Math.round(delay / 1000) + " s.");
        window.setTimeout(connect, delay);
      });
    }

    connect();
  }

  // Operations: post with the CSRF token, then follow the job until it finishes.
  function runOperation(form) {
    var action = form.getAttribute("data-operation");
    var output = document.getElementById("output-" + action);
    var button = form.querySelector("button");
    var progress = document.createElement("progress");
    progress.setAttribute("aria-label", button.textContent + " progress");
    var text = document.createElement("p");
    button.disabled = true;
    output.replaceChildren(progress, text);
    text.textContent = "Starting…";

    function finish(message, failed) {
      button.disabled = false;
      progress.remove();
      text.className = failed ? "error" : "result";
      text.textContent = message;
      refreshPositions();
      refreshJobs();
    }

    function follow(job) {
      output.setAttribute("data-job", job.id);
      output.setAttribute("data-state", job.state);
      if (job.total) {
        progress.max = job.total;
        progress.value = job.done || 0;
      }
      if (job.state === "running") {
        text.textContent = job.total ? job.label + ": " + (job.done || 0) + " of " + job.total + " events" : job.label + "…";
        window.setTimeout(function () {
          fetch(ui + "/api/jobs/" + encodeURIComponent(job.id), {
            credentials: "same-origin",
            headers: { Accept: "application/json" },
          })
            .then(function (response) { return response.json(); })
            .then(follow)
            .catch(function (error) { finish("Lost track of the job: " + error.message, true); });
        }, 250);
        return;
      }
      var lines = (job.lines || []).join("\n");
      finish(job.summary + (lines ? "\n" + lines : ""), job.state === "failed");
    }

    fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: {
        Accept: "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-CSRF-Token": csrf,
      },
      body: new URLSearchParams(new FormData(form)).toString(),
    })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.detail || "HTTP " + response.status);
          return body;
        });
      })
      .then(follow)
      .catch(function (error) { finish(error.message, true); });
  }

  function refreshPositions() {
    var list = document.getElementById("positions");
    if (!list) return;
    fetch(ui + "/api/positions", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (positions) {
        if (!positions) return;
        ["log", "projection", "pusher"].forEach(function (name) {
          var cell = list.querySelector('[data-position="' + name + '"]');
          if (cell && positions[name] !== null) cell.textContent = String(positions[name]);
        });
        var lag = list.querySelector('[data-position="lag"]');
        if (lag) lag.textContent = positions.lag + (positions.lag === 1 ? " event" : " events");
      });
  }

  // The list of recent operations, taken from a fresh copy of the page.
  function refreshJobs() {
    var section = document.getElementById("recent-jobs");
    if (!section) return;
    fetch(location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("recent-jobs");
        if (fresh) section.replaceChildren.apply(section, Array.prototype.slice.call(fresh.childNodes));
      });
  }

  var live = document.querySelector("[data-live-user]");
  if (live) watchUser(live);

  var forms = document.querySelectorAll("form[data-operation]");
  for (var i = 0; i < forms.length; i++) {
    forms[i].addEventListener("submit", function (event) {
      event.preventDefault();
      runOperation(event.currentTarget);
    });
  }
})();
